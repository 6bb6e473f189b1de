//! The facts the scheduler reads from an HF checkpoint directory itself (the worker reads the weights).

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    /// The directory's last component: what `info` calls the model.
    pub name: String,
    pub vocab_size: u32,
    pub max_position_embeddings: u32,
    /// From generation_config.json, where HF's `generate` takes them; config.json as a fallback.
    pub eos_token_ids: Vec<u32>,
    /// config.json's, for a router's `/model_info`.
    pub model_type: Option<String>,
    pub architectures: Vec<String>,
}

impl ModelFiles {
    pub fn load(dir: &Path) -> Result<Self> {
        let config = read_json(&dir.join("config.json"))?;
        let generation = read_json(&dir.join("generation_config.json")).ok();
        let number = |key: &str| -> Result<u32> {
            config
                .get(key)
                .and_then(Value::as_u64)
                .map(|v| v as u32)
                .with_context(|| format!("config.json has no {key}"))
        };
        let eos = generation
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
            .or_else(|| config.get("eos_token_id"))
            .map(ids_of)
            .unwrap_or_default();
        let dir = dir.canonicalize().with_context(|| format!("model directory {}", dir.display()))?;
        Ok(ModelFiles {
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            vocab_size: number("vocab_size")?,
            max_position_embeddings: number("max_position_embeddings")?,
            eos_token_ids: eos,
            model_type: config.get("model_type").and_then(Value::as_str).map(str::to_owned),
            architectures: config
                .get("architectures")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default(),
            dir,
        })
    }
}

/// `eos_token_id` is an integer or a list of integers in HF configs.
fn ids_of(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(items) => items.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        other => other.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_ids_come_as_a_number_or_a_list() {
        assert_eq!(ids_of(&serde_json::json!(7)), vec![7]);
        assert_eq!(ids_of(&serde_json::json!([151645, 151643])), vec![151645, 151643]);
        assert!(ids_of(&serde_json::json!(null)).is_empty());
    }

    #[test]
    fn reads_a_checkpoint_directory() {
        let dir = std::env::temp_dir().join(format!("minisgl-model-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"vocab_size": 100, "max_position_embeddings": 64, "eos_token_id": 3}"#,
        )
        .unwrap();
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [5, 3]}"#).unwrap();
        let m = ModelFiles::load(&dir).unwrap();
        assert_eq!((m.vocab_size, m.max_position_embeddings, m.eos_token_ids.clone()), (100, 64, vec![5, 3]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
