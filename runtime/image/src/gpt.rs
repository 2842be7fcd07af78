//! Just enough GPT to find a partition in an image file: its name and byte range.
//! (Image files use 512-byte sectors; the primary header is at LBA 1.)

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const SECTOR: u64 = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub index: usize,
    pub name: String,
    /// The partition type GUID, lowercase, in the usual text form.
    pub type_guid: String,
    pub offset: u64,
    pub size: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// GPT stores the first three fields of a GUID little-endian.
fn guid(b: &[u8]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// The partitions of a GPT disk image, in table order (empty slots skipped).
pub fn partitions(image: &Path) -> Result<Vec<Partition>, String> {
    let err = |e: std::io::Error| format!("cannot read {}: {e}", image.display());
    let mut f = std::fs::File::open(image).map_err(err)?;
    let mut header = [0u8; 92];
    f.seek(SeekFrom::Start(SECTOR)).map_err(err)?;
    f.read_exact(&mut header).map_err(err)?;
    if &header[0..8] != b"EFI PART" {
        return Err(format!(
            "{} has no GPT partition table (is it a raw disk image? qcow2 images cannot be \
             configured in place: configure the .raw, then convert)",
            image.display()
        ));
    }
    let entries_lba = le64(&header, 72);
    let count = le32(&header, 80) as usize;
    let entry_size = le32(&header, 84) as usize;
    if !(128..=4096).contains(&entry_size) || count > 1024 {
        return Err(format!("{}: implausible GPT header", image.display()));
    }
    let mut table = vec![0u8; count * entry_size];
    f.seek(SeekFrom::Start(entries_lba * SECTOR)).map_err(err)?;
    f.read_exact(&mut table).map_err(err)?;
    let mut out = Vec::new();
    for (index, e) in table.chunks(entry_size).enumerate() {
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        out.push(Partition {
            index: index + 1,
            name: String::from_utf16_lossy(&units),
            type_guid: guid(&e[0..16]),
            offset: first * SECTOR,
            size: (last + 1 - first) * SECTOR,
        });
    }
    Ok(out)
}

/// The partition with this GPT name.
pub fn find(image: &Path, name: &str) -> Result<Partition, String> {
    let parts = partitions(image)?;
    parts
        .iter()
        .find(|p| p.name == name)
        .cloned()
        .ok_or_else(|| {
            format!(
                "{} has no partition named {name:?} (it has: {}); is it a BeeMesh image?",
                image.display(),
                parts
                    .iter()
                    .map(|p| format!("{:?}", p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
