//! Section contents, decompressed when compressed (`SHF_COMPRESSED`, `.zdebug_*`). The
//! uncompressed size is read from the file itself: a corrupt one claiming terabytes is
//! refused before anything is allocated for it.

use std::borrow::Cow;

use anyhow::{Context, Result, bail};
use object::{CompressionFormat, ObjectSection};

/// zlib cannot expand more than 1032:1, and zstd gets nowhere near that on real sections.
const MAX_RATIO: u64 = 1032;

/// The bytes of `section`, uncompressed.
pub fn uncompressed<'data>(section: &impl ObjectSection<'data>) -> Result<Cow<'data, [u8]>> {
    let range = section
        .compressed_file_range()
        .context("reading the compression header")?;
    if range.format != CompressionFormat::None
        && range.uncompressed_size > range.compressed_size.saturating_mul(MAX_RATIO)
    {
        bail!(
            "section claims {} bytes uncompressed from {} compressed",
            range.uncompressed_size,
            range.compressed_size
        );
    }
    Ok(section.uncompressed_data()?)
}
