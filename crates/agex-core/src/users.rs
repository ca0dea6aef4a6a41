//! The users and groups of the host agex runs on: names looked up through NSS
//! (`getpwnam_r`/`getgrnam_r`, so LDAP, sssd and systemd's dynamic users resolve as
//! they do for every other tool), and whether this process is root.

use std::ffi::CString;

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The uid of user `name`, `None` when there is no such user.
pub fn user_id(name: &str) -> Result<Option<u32>, std::io::Error> {
    nss_lookup(name, true)
}

/// The gid of group `name`, `None` when there is no such group.
pub fn group_id(name: &str) -> Result<Option<u32>, std::io::Error> {
    nss_lookup(name, false)
}

/// `getpwnam_r`/`getgrnam_r`, growing the buffer as NSS asks.
fn nss_lookup(name: &str, user: bool) -> Result<Option<u32>, std::io::Error> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        let mut found = false;
        let mut id = 0u32;
        // SAFETY: every pointer is valid for the call; the buffer's length is passed with
        // it; the result pointer is only read when the call reports success.
        let rc = unsafe {
            if user {
                let mut pwd: libc::passwd = std::mem::zeroed();
                let mut result: *mut libc::passwd = std::ptr::null_mut();
                let rc = libc::getpwnam_r(
                    cname.as_ptr(),
                    &mut pwd,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                );
                if rc == 0 && !result.is_null() {
                    found = true;
                    id = pwd.pw_uid;
                }
                rc
            } else {
                let mut grp: libc::group = std::mem::zeroed();
                let mut result: *mut libc::group = std::ptr::null_mut();
                let rc = libc::getgrnam_r(
                    cname.as_ptr(),
                    &mut grp,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut result,
                );
                if rc == 0 && !result.is_null() {
                    found = true;
                    id = grp.gr_gid;
                }
                rc
            }
        };
        match rc {
            0 => return Ok(found.then_some(id)),
            libc::ERANGE if buf.len() < (1 << 22) => {
                let n = buf.len() * 2;
                buf.resize(n, 0);
            }
            // "Not found" as some NSS modules report it.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            other => return Err(std::io::Error::from_raw_os_error(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_uid_0_and_an_unknown_name_is_none() {
        assert_eq!(user_id("root").unwrap(), Some(0));
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(user_id("agex-no-such-user-x").unwrap(), None);
        assert_eq!(user_id("bad\0name").unwrap(), None);
    }
}
