//! Nagle's algorithm off for the embedded broker's connections.
//!
//! rumqttd 0.20 accepts connections with Nagle on and has no setting for
//! it. The broker writes a PUBACK, then the message that answers it a
//! moment later; Nagle holds that second small write until the peer
//! acknowledges the first, and the peer delays its ACK by about 40 ms. So
//! `palaver up` answered every message some 44 ms late.
//!
//! Linux gives an accepted socket its listener's options, TCP_NODELAY
//! among them, so setting it once on rumqttd's listener covers every
//! connection accepted after that. The listener was opened by rumqttd on
//! its own thread, but it is a descriptor of this process: `pidfd_getfd`
//! (Linux 5.6) hands us a duplicate of it without any unsafe code.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};

use rustix::io::Errno;
use rustix::net::sockopt;
use rustix::process::{getpid, pidfd_getfd, pidfd_open, PidfdFlags, PidfdGetfdFlags};

/// Sets TCP_NODELAY on the socket of this process that listens on `addr`.
pub fn set_on_listener(addr: SocketAddr) -> io::Result<()> {
    let listener = own_socket(|fd| {
        sockopt::socket_acceptconn(fd).unwrap_or(false) && local_addr(fd) == Some(addr)
    })?
    .ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("this process has no socket listening on {addr}"),
        )
    })?;
    sockopt::set_tcp_nodelay(&listener, true)?;
    Ok(())
}

/// A duplicate of the first socket of this process that `wanted` accepts.
pub(crate) fn own_socket(wanted: impl Fn(&OwnedFd) -> bool) -> io::Result<Option<OwnedFd>> {
    let this_process = pidfd_open(getpid(), PidfdFlags::empty())?;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        // A descriptor closed since the listing is skipped; one whose
        // number was reused is checked by `wanted` like any other.
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let number = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok());
        let Some(number) = number.filter(|_| is_socket) else {
            continue;
        };
        let fd = match pidfd_getfd(&this_process, number, PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            Err(Errno::BADF) => continue,
            // Not permitted (a seccomp filter) or not there (before 5.6):
            // no descriptor can be had, so say why instead of "not found".
            Err(e) => return Err(e.into()),
        };
        if wanted(&fd) {
            return Ok(Some(fd));
        }
    }
    Ok(None)
}

fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    rustix::net::getsockname(fd).ok()?.try_into().ok()
}

#[cfg(test)]
pub(crate) fn peer_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    rustix::net::getpeername(fd).ok()??.try_into().ok()
}
