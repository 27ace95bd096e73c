//! `--reset-mounted-flag`: clear a mount token left behind by a crash (spec 5.2 item 4).

use tracing::info;

use crate::store::Volume;

pub fn run(volume: &dyn Volume, quiet: bool) -> Result<(), String> {
    let desc = volume.description();
    if !quiet {
        info!("resetting mount token for {desc}");
    }
    volume
        .write_mount_token(None)
        .map_err(|e| format!("can't reset the mount token of {desc}: {e}"))?;
    if !quiet {
        info!("done");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::geometry::Geometry;

    #[test]
    fn reset_deletes_the_token() {
        let vol = MemoryBackend::new(Geometry::new(4096, 4096).unwrap());
        vol.write_mount_token(Some(0x1234)).unwrap();
        run(&vol, true).unwrap();
        assert_eq!(vol.read_mount_token().unwrap(), None);
    }
}
