//! Reading a tar stream entry by entry without storing it: what `borg export-tar … -`
//! writes (Python's `tarfile`, GNU format: `././@LongLink` names, base-256 sizes), and
//! POSIX ustar/pax for good measure. Drills hash each file as it passes.

use std::io::{self, Read};

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file; its bytes follow.
    File,
    /// Another name of a file earlier in the stream (`link` names it).
    HardLink,
    /// Anything else: directory, symbolic link, fifo, device.
    Other,
}

/// One entry's header.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The path as stored (borg: relative, no leading `/`).
    pub path: Vec<u8>,
    /// What it is.
    pub kind: EntryKind,
    /// Bytes of content that follow.
    pub size: u64,
    /// A hard link's target path.
    pub link: Vec<u8>,
}

const BLOCK: usize = 512;

/// Calls `each` with every entry and a reader of exactly its content; what `each` does
/// not read is skipped. Returns at the end-of-archive block (or a clean end of input).
pub fn for_each<R: Read>(
    mut input: R,
    mut each: impl FnMut(&Entry, &mut dyn Read) -> io::Result<()>,
) -> io::Result<()> {
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut pax_size: Option<u64> = None;
    loop {
        let mut header = [0u8; BLOCK];
        if !read_block(&mut input, &mut header)? || header.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let size = match pax_size.take() {
            Some(s) => s,
            None => number(&header[124..136])?,
        };
        let typeflag = header[156];
        match typeflag {
            // GNU long name / long link: the body is the next entry's name.
            b'L' | b'K' => {
                let body = read_body(&mut input, size)?;
                let name = cstr(&body).to_vec();
                if typeflag == b'L' {
                    long_name = Some(name);
                } else {
                    long_link = Some(name);
                }
                continue;
            }
            // pax extended header: `len key=value\n` records for the next entry.
            b'x' => {
                let body = read_body(&mut input, size)?;
                for (key, value) in pax_records(&body) {
                    match key {
                        b"path" => long_name = Some(value.to_vec()),
                        b"linkpath" => long_link = Some(value.to_vec()),
                        b"size" => {
                            pax_size = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok())
                        }
                        _ => {}
                    }
                }
                continue;
            }
            b'g' => {
                read_body(&mut input, size)?;
                continue;
            }
            _ => {}
        }
        let path = long_name.take().unwrap_or_else(|| {
            let name = cstr(&header[0..100]);
            // POSIX ustar splits long names into prefix/name; GNU uses those bytes
            // for other things (its magic is "ustar  ").
            if &header[257..263] == b"ustar\0" && header[345] != 0 {
                let mut p = cstr(&header[345..500]).to_vec();
                p.push(b'/');
                p.extend_from_slice(name);
                p
            } else {
                name.to_vec()
            }
        });
        let link = long_link
            .take()
            .unwrap_or_else(|| cstr(&header[157..257]).to_vec());
        let kind = match typeflag {
            b'0' | 0 | b'7' => EntryKind::File,
            b'1' => EntryKind::HardLink,
            _ => EntryKind::Other,
        };
        // Only regular files carry content; a size on anything else is skipped too.
        let entry = Entry {
            path,
            kind,
            size,
            link,
        };
        let mut body = (&mut input).take(size);
        each(&entry, &mut body)?;
        io::copy(&mut body, &mut io::sink())?;
        if body.limit() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar stream ends inside an entry",
            ));
        }
        skip_padding(&mut input, size)?;
    }
}

/// Reads one block; false on a clean end of input before it.
fn read_block(input: &mut impl Read, block: &mut [u8; BLOCK]) -> io::Result<bool> {
    let mut got = 0;
    while got < BLOCK {
        match input.read(&mut block[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar stream ends inside a header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A small header body (long name, pax records), at most 1 MiB.
fn read_body(input: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    if size > 1 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("tar extended header of {size} bytes"),
        ));
    }
    let mut body = vec![0u8; size as usize];
    input.read_exact(&mut body)?;
    skip_padding(input, size)?;
    Ok(body)
}

fn skip_padding(input: &mut impl Read, size: u64) -> io::Result<()> {
    let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
    let mut buf = [0u8; BLOCK];
    input.read_exact(&mut buf[..pad as usize])
}

/// A numeric header field: octal ASCII, or GNU base-256 (high bit of the first byte).
fn number(field: &[u8]) -> io::Result<u64> {
    if field[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            n = n
                .checked_mul(256)
                .and_then(|n| n.checked_add(u64::from(*b)))
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "tar size overflows"))?;
        }
        return Ok(n);
    }
    let text = std::str::from_utf8(field)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "tar size is not octal"))?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(digits, 8).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("tar size `{digits}` is not octal"),
        )
    })
}

fn cstr(field: &[u8]) -> &[u8] {
    field.split(|b| *b == 0).next().unwrap_or(field)
}

fn pax_records(body: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Some(space) = rest.iter().position(|b| *b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
        else {
            break;
        };
        if len <= space + 1 || len > rest.len() {
            break;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|b| *b == b'=') {
            out.push((&record[..eq], &record[eq + 1..]));
        }
        rest = &rest[len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &[u8], size: u64, typeflag: u8, link: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        let s = format!("{size:011o}\0");
        h[124..136].copy_from_slice(s.as_bytes());
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..265].copy_from_slice(b"ustar  \0");
        h
    }

    fn body(data: &[u8]) -> Vec<u8> {
        let mut b = data.to_vec();
        b.resize(data.len().div_ceil(BLOCK) * BLOCK, 0);
        b
    }

    #[test]
    fn reads_files_long_names_links_and_stops_at_the_end_block() {
        let long = "d/".repeat(80) + "file";
        let mut tar = Vec::new();
        tar.extend(header(b"dir/", 0, b'5', b""));
        tar.extend(header(b"dir/a", 700, b'0', b""));
        tar.extend(body(&[7u8; 700]));
        tar.extend(header(b"././@LongLink", long.len() as u64 + 1, b'L', b""));
        tar.extend(body(format!("{long}\0").as_bytes()));
        tar.extend(header(b"ignored", 3, b'0', b""));
        tar.extend(body(b"xyz"));
        tar.extend(header(b"dir/b", 0, b'1', b"dir/a"));
        tar.extend([0u8; 2 * BLOCK]);
        tar.extend(b"trailing garbage is never read");
        let mut seen = Vec::new();
        for_each(&tar[..], |e, r| {
            let mut data = Vec::new();
            r.read_to_end(&mut data)?;
            seen.push((
                String::from_utf8_lossy(&e.path).into_owned(),
                e.kind,
                data,
                e.link.clone(),
            ));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0].1, EntryKind::Other);
        assert_eq!((seen[1].0.as_str(), seen[1].2.len()), ("dir/a", 700));
        assert_eq!(
            (seen[2].0.as_str(), seen[2].2.as_slice()),
            (long.as_str(), &b"xyz"[..])
        );
        assert_eq!(
            (seen[3].1, seen[3].3.as_slice()),
            (EntryKind::HardLink, &b"dir/a"[..])
        );
    }

    #[test]
    fn a_cut_stream_is_an_error() {
        let mut tar = header(b"a", 1000, b'0', b"");
        tar.extend([1u8; 600]);
        assert!(for_each(&tar[..], |_, _| Ok(())).is_err());
    }

    #[test]
    fn base_256_sizes() {
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[7] = 0x02; // 2 << 32
        assert_eq!(number(&field).unwrap(), 2 << 32);
        assert_eq!(number(b"00000001750\0").unwrap(), 1000);
    }
}
