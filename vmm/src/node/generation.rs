//! The generation a node last ran the VM in, persisted beside its disk (DESIGN §5: a granted
//! generation is persisted, synced, before any output is released or any block written under
//! it; a joiner persists the generation it adopts before its first ack).

use std::io::Write;
use std::path::{Path, PathBuf};

/// The persisted generation of one node.
#[derive(Clone, Debug)]
pub struct GenerationFile {
    path: PathBuf,
}

impl GenerationFile {
    /// The file at `path` (it may not exist yet: generation 0).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        GenerationFile { path: path.into() }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted generation (0 if the file does not exist).
    pub fn load(&self) -> Result<u64, String> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("generation"))
            .and_then(|r| r.trim().strip_prefix('='))
            .map(str::trim)
            .ok_or_else(|| format!("{}: no `generation = N` line", self.path.display()))?;
        v.parse()
            .map_err(|_| format!("{}: bad generation {v:?}", self.path.display()))
    }

    /// Persists `generation`: written to a temporary file, synced, renamed over the old one,
    /// and the directory synced, so a crash leaves the old or the new value, never neither.
    pub fn store(&self, generation: u64) -> Result<(), String> {
        let err = |e: std::io::Error| {
            format!("persisting the generation in {}: {e}", self.path.display())
        };
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            writeln!(
                f,
                "# written by ftvm-node: the generation this node last ran the VM in"
            )
            .map_err(err)?;
            writeln!(f, "generation = {generation}").map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_zero_and_stored_values_read_back() {
        let d = tempfile::tempdir().unwrap();
        let g = GenerationFile::new(d.path().join("disk.img.ftvm-generation"));
        assert_eq!(g.load().unwrap(), 0);
        g.store(7).unwrap();
        assert_eq!(g.load().unwrap(), 7);
        g.store(8).unwrap();
        assert_eq!(g.load().unwrap(), 8);
        std::fs::write(g.path(), "generation = x\n").unwrap();
        assert!(g.load().unwrap_err().contains("bad generation"));
        std::fs::write(g.path(), "nothing\n").unwrap();
        assert!(g.load().is_err());
    }
}
