//! Stop conditions that need only token ids. Stop strings need text and live with the detokenizer; they end a
//! request through `Core::finish`.

use super::request::{FinishReason, SamplingParams};

/// Why a request ends after sampling `token`, if it does. `generated` counts `token`; `total_len` is the prompt
/// plus everything generated, `token` included.
///
/// A stop token wins over a length limit reached by the same token, so a model that ends on its last allowed
/// token reports `Stop`.
pub(crate) fn stop_reason(
    token: u32,
    generated: u32,
    total_len: u32,
    params: &SamplingParams,
    eos_token_ids: &[u32],
    max_seq_len: u32,
) -> Option<FinishReason> {
    if (!params.ignore_eos && eos_token_ids.contains(&token)) || params.stop_token_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if generated >= params.max_tokens || total_len >= max_seq_len {
        // At `max_seq_len` the sampled token has no position left to be fed back at.
        Some(FinishReason::Length)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: &[u32] = &[2, 3];

    fn params(max_tokens: u32, stop: &[u32], ignore_eos: bool) -> SamplingParams {
        SamplingParams {
            max_tokens,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            seed: 0,
            stop_token_ids: stop.to_vec(),
            ignore_eos,

            ..Default::default()
        }
    }

    #[test]
    fn eos_unless_ignored() {
        assert_eq!(stop_reason(3, 1, 10, &params(9, &[], false), EOS, 100), Some(FinishReason::Stop));
        assert_eq!(stop_reason(3, 1, 10, &params(9, &[], true), EOS, 100), None);
    }

    #[test]
    fn stop_token_ids_even_with_ignore_eos() {
        assert_eq!(stop_reason(7, 1, 10, &params(9, &[7], true), EOS, 100), Some(FinishReason::Stop));
        assert_eq!(stop_reason(8, 1, 10, &params(9, &[7], true), EOS, 100), None);
    }

    #[test]
    fn length_limits() {
        assert_eq!(stop_reason(5, 9, 10, &params(9, &[], false), EOS, 100), Some(FinishReason::Length));
        assert_eq!(stop_reason(5, 8, 10, &params(9, &[], false), EOS, 100), None);
        assert_eq!(stop_reason(5, 1, 100, &params(9, &[], false), EOS, 100), Some(FinishReason::Length));
        assert_eq!(stop_reason(5, 1, 99, &params(9, &[], false), EOS, 100), None);
    }

    #[test]
    fn stop_wins_over_length() {
        assert_eq!(stop_reason(2, 9, 100, &params(9, &[], false), EOS, 100), Some(FinishReason::Stop));
    }
}
