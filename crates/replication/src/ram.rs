//! Read-only view of a guest's RAM file (QEMU's shared memory backend).

use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, MmapOptions};

/// The guest's RAM, mapped shared and read-only.
///
/// QEMU keeps writing to this memory while the guest runs. tandem reads it
/// either while the guest is stopped ([`RamMap::live`], used inside the
/// epoch's stop window) or accepting torn pages ([`RamMap::snapshot`] for
/// the initial copy, whose pages are re-checked by the next scan).
pub struct RamMap {
    file: File,
    map: Mmap,
}

impl RamMap {
    pub fn open(path: &Path, size: u64) -> std::io::Result<RamMap> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len < size {
            return Err(std::io::Error::other(format!(
                "{} is {len} bytes, the guest has {size}",
                path.display()
            )));
        }
        // SAFETY: the mapping is read-only and shared with QEMU, which may
        // change the bytes underneath us. We only ever copy or hash them,
        // never rely on two reads agreeing, and the file is never truncated
        // while the VM exists (its RAM would vanish from under QEMU too).
        let map = unsafe { MmapOptions::new().len(size as usize).map(&file)? };
        Ok(RamMap { file, map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The live bytes. Stable only while the guest is stopped.
    pub fn live(&self) -> &[u8] {
        &self.map
    }

    /// The file QEMU's RAM lives in.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Pages that may hold data (the rest are holes and read as zero);
    /// `None` when the file cannot say, and every page must be read.
    /// Stable only while the guest is stopped.
    pub fn data_pages(&self) -> Option<tandem_dirty::PageSet> {
        match tandem_dirty::data_pages(&self.file, &self.map) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::debug!("cannot find the RAM file's holes: {e}");
                None
            }
        }
    }

    /// A private copy of all of RAM, taken while the guest may be running.
    pub fn snapshot(&self) -> Vec<u8> {
        self.map.to_vec()
    }
}
