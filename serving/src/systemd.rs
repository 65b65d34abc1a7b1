//! systemd's readiness protocol (`sd_notify`) without libsystemd: a datagram with `READY=1` or
//! `STOPPING=1` to the socket systemd names in `$NOTIFY_SOCKET`. Outside systemd (no variable)
//! every call is a no-op, so the binaries behave the same in a terminal.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1\nSTATUS=serving`) to systemd; Ok(false) when not under systemd.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    // A leading '@' names a socket in the abstract namespace (no file).
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// Tells systemd the service is ready (`Type=notify` units are "started" only now). A failure
/// is logged, not fatal: the service works, only its supervision is weaker.
pub fn ready(status: &str) {
    if let Err(e) = notify(&format!("READY=1\nSTATUS={status}")) {
        tracing::warn!("could not tell systemd we are ready (NOTIFY_SOCKET): {e}");
    }
}

/// Tells systemd the service is stopping, so a restart is not mistaken for a crash.
pub fn stopping(status: &str) {
    if let Err(e) = notify(&format!("STOPPING=1\nSTATUS={status}")) {
        tracing::warn!("could not tell systemd we are stopping (NOTIFY_SOCKET): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_the_named_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        // One test owns the variable; no other test of this crate reads it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!notify("READY=1").unwrap(), "without NOTIFY_SOCKET nothing is sent");
    }
}
