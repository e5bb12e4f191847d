//! The template's initramfs, written here rather than with `cpio`: busybox at
//! `/bin/busybox`, the agent as `/init`, and the mount points it uses.

/// An initramfs (an uncompressed `newc` cpio archive): busybox at `/bin/busybox`, the
/// agent as `/init`, and the mount points it uses.
pub fn initramfs(busybox: &[u8], agent: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(busybox.len() + agent.len() + 4096);
    let entries: [(&str, u32, &[u8]); 8] = [
        ("bin", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox),
        ("init", 0o100755, agent),
        ("dev", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("sys", 0o040755, b""),
        ("tmp", 0o041777, b""),
        ("TRAILER!!!", 0, b""),
    ];
    for (ino, (name, mode, data)) in entries.into_iter().enumerate() {
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let header = format!(
            "070701{:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            ino + 1,
            0,
            0,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of a `newc` archive: name, mode, data.
    fn entries(mut a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&a[..6], b"070701", "magic at {offset}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, name_len) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&a[110..110 + name_len - 1]).unwrap().to_string();
            assert_eq!(a[110 + name_len - 1], 0, "names end with NUL");
            let data_at = (offset + 110 + name_len).next_multiple_of(4) - offset;
            let data = a[data_at..data_at + size].to_vec();
            let next = (offset + data_at + size).next_multiple_of(4) - offset;
            let done = name == "TRAILER!!!";
            out.push((name, mode, data));
            if done {
                assert_eq!(next, a.len(), "nothing after the trailer");
                return out;
            }
            a = &a[next..];
            offset += next;
        }
    }

    #[test]
    fn the_archive_holds_busybox_the_agent_as_init_and_mount_points() {
        let archive = initramfs(b"busybox!", b"agent");
        assert_eq!(archive.len() % 4, 0);
        let e = entries(&archive);
        let names: Vec<&str> = e.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "init", "dev", "proc", "sys", "tmp", "TRAILER!!!"]
        );
        assert_eq!((e[1].1, e[1].2.as_slice()), (0o100755, &b"busybox!"[..]));
        assert_eq!((e[2].1, e[2].2.as_slice()), (0o100755, &b"agent"[..]));
        assert_eq!(e[6].1, 0o041777, "/tmp is sticky and world-writable");
    }
}
