//! Bounded echoes of untrusted input: an error message or log line that quotes what a
//! client sent shows at most [`ECHO_CHARS`] characters of it, so a 3 MiB job id or a 10 kB
//! environment name never comes back whole (gRPC metadata over 16 KiB cannot even be read
//! by the client) and never fills a log line.

use std::fmt;

/// How many characters of an untrusted value an error or log line shows.
pub const ECHO_CHARS: usize = 100;

/// Displays a value cut to [`ECHO_CHARS`] characters, Debug-quoted (control characters
/// escaped), followed by ` (cut; N bytes)` when it was longer. Use it wherever a message
/// echoes what a client, a config or a remote server sent:
///
/// ```
/// use ferry_core::Bounded;
/// assert_eq!(Bounded("pg").to_string(), "\"pg\"");
/// let long = "x".repeat(5000);
/// let shown = Bounded(&long).to_string();
/// assert!(shown.ends_with(" (cut; 5000 bytes)") && shown.len() < 130);
/// ```
#[derive(Clone, Copy)]
pub struct Bounded<'a>(pub &'a str);

impl fmt::Display for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        match s.char_indices().nth(ECHO_CHARS) {
            None => write!(f, "{s:?}"),
            Some((end, _)) => write!(f, "{:?} (cut; {} bytes)", &s[..end], s.len()),
        }
    }
}

impl fmt::Debug for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(Bounded("a\nb").to_string(), "\"a\\nb\"");
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary_with_their_size() {
        let long = "é".repeat(3 * 1024 * 1024);
        let shown = Bounded(&long).to_string();
        assert!(shown.len() < 250, "{shown}");
        assert!(shown.ends_with(&format!(" (cut; {} bytes)", long.len())));
    }
}
