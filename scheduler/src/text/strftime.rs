//! `strftime_now(format)`, the template global transformers provides (Llama 3 templates print today's date).
//! Python's `datetime.now().strftime` hands the format to the C library after expanding `%f`, `%z` and `%Z`
//! itself; doing the same through libc gives the same text, local time zone and locale included.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{Error, ErrorKind};

pub fn strftime_now(format: &str) -> Result<String, Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    strftime_local(format, now.as_secs() as i64, now.subsec_micros())
}

/// Formats the local time of `unix_secs`, `micros` within that second.
pub fn strftime_local(format: &str, unix_secs: i64, micros: u32) -> Result<String, Error> {
    let format = expand_python_directives(format, micros);
    let time = unix_secs as libc::time_t;
    // SAFETY: localtime_r only writes the tm we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&time, &mut tm) }.is_null() {
        return Err(Error::new(ErrorKind::InvalidOperation, "strftime_now: the local time is not representable"));
    }
    // A trailing marker tells an output too long for the buffer (strftime returns 0) from an empty one.
    let c_format = std::ffi::CString::new(format + "|")
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime_now: the format contains a NUL"))?;
    let mut capacity = 256;
    while capacity <= 1 << 20 {
        let mut buf = vec![0u8; capacity];
        // SAFETY: buf has `capacity` writable bytes and the format is NUL-terminated.
        let len = unsafe { libc::strftime(buf.as_mut_ptr().cast(), capacity, c_format.as_ptr(), &tm) };
        if len > 0 {
            buf.truncate(len - 1);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        capacity *= 4;
    }
    Err(Error::new(ErrorKind::InvalidOperation, "strftime_now: the formatted time is too long"))
}

/// Expands what Python expands before calling C: `%f` (microseconds) and, for the naive time
/// `datetime.now()` returns, `%z`, `%:z` and `%Z` as empty text. `%%` stays for C.
fn expand_python_directives(format: &str, micros: u32) -> String {
    let mut out = String::with_capacity(format.len());
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('f') => out.push_str(&format!("{micros:06}")),
            Some('z' | 'Z') => {}
            Some(':') if chars.peek() == Some(&'z') => {
                chars.next();
            }
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_directives_are_expanded_before_c() {
        assert_eq!(expand_python_directives("%H:%M:%S.%f%z%Z%:z %% %", 42), "%H:%M:%S.000042 %% %");
    }

    #[test]
    fn dates_format_through_the_c_library() {
        // 2024-07-23 12:34:56 UTC: whatever the local zone, the year and the second are the same.
        let text = strftime_local("%Y|%S|%%|%f", 1_721_738_096, 7).unwrap();
        assert_eq!(text, "2024|56|%|000007");
        assert_eq!(strftime_local("", 0, 0).unwrap(), "");
        let long = "%Y".repeat(500);
        assert_eq!(strftime_local(&long, 1_721_738_096, 0).unwrap(), "2024".repeat(500));
    }

    #[test]
    fn now_has_the_current_year() {
        let year: i32 = strftime_now("%Y").unwrap().parse().unwrap();
        assert!(year >= 2024);
    }
}
