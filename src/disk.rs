//! Free space of a volume (statvfs through rustix: no unsafe of our own).

use std::path::Path;

/// Bytes an unprivileged writer can still use on the volume holding `path` (`f_bavail ×
/// f_frsize`: the root-reserved blocks do not count).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_bytes_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::free_bytes(dir.path()).unwrap() > 0);
        assert!(super::free_bytes(&dir.path().join("missing")).is_err());
    }
}
