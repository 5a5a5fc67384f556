//! Orders between the coordinator and its agents (issue 14, item 4), end to end on real
//! PostgreSQL, sshd and the real binaries, the agents called directly with the
//! coordinator's certificate where the test plays the coordinator:
//! - the daemons' log files hold no terminal colour codes.

use std::fs;

use ferry_tests::*;

#[test]
fn daemon_log_files_hold_no_terminal_colour_codes() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
    for (which, says) in [
        ("agent-prod", "Job succeeded."),
        ("agent-stage", "Job succeeded."),
        ("coordinator", "Succeeded"),
    ] {
        let path = d.dir.path().join(format!("{which}.log"));
        let log = fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&log);
        assert!(text.contains(says), "{which}: {text}");
        if let Some(line) = text.lines().find(|l| l.contains('\u{1b}')) {
            panic!(
                "{} holds an ANSI escape (ESC byte), e.g. {line:?}",
                path.display()
            );
        }
    }
}
