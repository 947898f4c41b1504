//! What the VM runs make once and keep under `target/vm` (kernels,
//! userlands, the systemd root file system): each beside a stamp file that
//! says what it was made from. A different recipe remakes it, and a make
//! that was interrupted (no stamp yet) is made again.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};

/// Runs `make` unless `stamp` says it was already made from `recipe`.
pub fn once(stamp: &Path, recipe: &str, make: impl FnOnce() -> Result<()>) -> Result<()> {
    if fs::read_to_string(stamp).ok().as_deref() == Some(recipe) {
        return Ok(());
    }
    let _ = fs::remove_file(stamp);
    make()?;
    fs::write(stamp, recipe).with_context(|| format!("writing {}", stamp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_per_recipe_and_again_after_a_failure() {
        let dir = std::env::temp_dir().join(format!("xtask-cache-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let stamp = dir.join("thing.stamp");
        let mut made = 0;
        for recipe in ["a,b", "a,b", "a,b,c"] {
            once(&stamp, recipe, || {
                made += 1;
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(made, 2, "the same recipe twice is made once");
        // A failed make leaves no stamp: the next run tries again.
        assert!(once(&stamp, "d", || anyhow::bail!("no network")).is_err());
        once(&stamp, "d", || {
            made += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(made, 3);
        fs::remove_dir_all(&dir).unwrap();
    }
}
