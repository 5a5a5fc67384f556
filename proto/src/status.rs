//! A gRPC [`tonic::Status`] in words, for logs, job errors and the CLI's messages.

/// A gRPC status in words: `PermissionDenied: message`, with transport causes spelled out
/// (each once, [`ferry_core::telemetry::join_causes`]).
pub fn describe_status(s: &tonic::Status) -> String {
    use std::error::Error;
    let head = format!("{:?}: {}", s.code(), s.message());
    let causes = std::iter::successors(s.source(), |e| (*e).source()).map(ToString::to_string);
    ferry_core::telemetry::join_causes(std::iter::once(head).chain(causes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_its_code_and_message() {
        let s = tonic::Status::permission_denied("operator bob may not restore");
        assert_eq!(
            describe_status(&s),
            "PermissionDenied: operator bob may not restore"
        );
    }
}
