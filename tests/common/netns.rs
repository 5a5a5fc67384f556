//! A host of its own on this machine: a network namespace joined to the root namespace
//! by a veth pair with addresses the test picks (`10.<a>.<b>.1/30` on the host side,
//! `.2` inside), so a test can cut and restore the link (`ip link set ... down/up`) the
//! way a switch port or a cable fails. Removed on drop. Needs root and `ip` (iproute2).

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::process::{require, require_root, run_ok};

/// A network namespace with a veth link to the root namespace (see the module docs).
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    /// Creates the namespace `ferry<pid>n<k>` and its link, both ends up, loopback up
    /// inside. Addresses come from `10.231.0.0/16`, distinct per process and call.
    pub fn create() -> Netns {
        require_root("create a network namespace");
        let ip = require("ip", "iproute2");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let slot = (pid.wrapping_mul(7) + k) % 16_000;
        let (a, b) = (slot / 64, (slot % 64) * 4);
        let n = Netns {
            name: format!("ferry{pid}n{k}"),
            host_if: format!("fh{pid}n{k}"),
            ns_if: format!("fn{pid}n{k}"),
            host_ip: format!("10.{}.{a}.{}", 231, b + 1),
            ns_ip: format!("10.{}.{a}.{}", 231, b + 2),
        };
        // Interface names are limited to 15 bytes.
        assert!(
            n.host_if.len() <= 15,
            "interface name {} too long",
            n.host_if
        );
        let run = |args: &[&str]| run_ok(Command::new(&ip).args(args));
        run(&["netns", "add", &n.name]);
        run(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if, "netns", &n.name,
        ]);
        run(&[
            "addr",
            "add",
            &format!("{}/30", n.host_ip),
            "dev",
            &n.host_if,
        ]);
        run(&["link", "set", &n.host_if, "up"]);
        n.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", n.ns_ip),
            "dev",
            &n.ns_if,
        ]);
        n.exec_ok(&["ip", "link", "set", &n.ns_if, "up"]);
        n.exec_ok(&["ip", "link", "set", "lo", "up"]);
        n
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace (where its servers listen).
    pub fn ip(&self) -> &str {
        &self.ns_ip
    }

    /// The host side's address.
    pub fn host_ip(&self) -> &str {
        &self.host_ip
    }

    /// `ip netns exec NAME` followed by `program`: a command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(require("ip", "iproute2"));
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    fn exec_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        run_ok(&mut cmd)
    }

    /// Cuts the link: both ends of the veth go down, so packets are dropped silently,
    /// as when a cable is pulled (established TCP connections hang, they are not reset).
    pub fn cut(&self) {
        run_ok(Command::new(require("ip", "iproute2")).args([
            "link",
            "set",
            &self.host_if,
            "down",
        ]));
        self.exec_ok(&["ip", "link", "set", &self.ns_if, "down"]);
    }

    /// Restores the link cut by [`Netns::cut`].
    pub fn restore(&self) {
        self.exec_ok(&["ip", "link", "set", &self.ns_if, "up"]);
        run_ok(Command::new(require("ip", "iproute2")).args(["link", "set", &self.host_if, "up"]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ip = require("ip", "iproute2");
        // Deleting one end deletes the pair; processes still inside keep the namespace
        // alive until they exit.
        let _ = Command::new(&ip)
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new(&ip)
            .args(["netns", "del", &self.name])
            .output();
    }
}
