//! A loss curve as a PNG, written without image dependencies (stored deflate blocks).

use std::path::Path;

use anyhow::{Context, Result};

const W: usize = 640;
const H: usize = 360;
const MARGIN: usize = 30;

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut c = kind.to_vec();
    c.extend(data);
    out.extend(&c);
    out.extend(crc32(&c).to_be_bytes());
}

/// Encodes an RGB image as PNG.
fn encode_png(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity((w * 3 + 1) * h);
    for row in rgb.chunks(w * 3) {
        raw.push(0); // filter: none
        raw.extend(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend(len.to_le_bytes());
        z.extend((!len).to_le_bytes());
        z.extend(*block);
    }
    z.extend(adler32(&raw).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend((w as u32).to_be_bytes());
    ihdr.extend((h as u32).to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &z);
    chunk(&mut png, b"IEND", &[]);
    png
}

/// Plots (step, loss) as a line on a white canvas with axes and writes it to `path`.
pub fn loss_curve_png(points: &[(usize, f64)], path: &Path) -> Result<()> {
    let mut img = vec![255u8; W * H * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < W && y < H {
            img[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    for x in MARGIN..W - MARGIN / 2 {
        put(x, H - MARGIN, [0, 0, 0]);
    }
    for y in MARGIN / 2..H - MARGIN {
        put(MARGIN, y, [0, 0, 0]);
    }
    let finite: Vec<(usize, f64)> = points
        .iter()
        .copied()
        .filter(|(_, l)| l.is_finite())
        .collect();
    if !finite.is_empty() {
        let (s0, s1) = (finite[0].0 as f64, finite[finite.len() - 1].0 as f64);
        let hi = finite.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let lo = finite.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(0.0);
        let span_x = (W - MARGIN - MARGIN / 2 - 1) as f64;
        let span_y = (H - MARGIN - MARGIN / 2 - 1) as f64;
        let to_px = |s: usize, l: f64| {
            let x = MARGIN as f64 + 1.0 + span_x * (s as f64 - s0) / (s1 - s0).max(1.0);
            let y = (H - MARGIN) as f64 - 1.0 - span_y * (l - lo) / (hi - lo).max(1e-12);
            (x, y)
        };
        let mut prev: Option<(f64, f64)> = None;
        for &(s, l) in &finite {
            let (x, y) = to_px(s, l);
            if let Some((px, py)) = prev {
                let n = ((x - px).abs().max((y - py).abs()) as usize).max(1);
                for i in 0..=n {
                    let t = i as f64 / n as f64;
                    let (xx, yy) = (px + t * (x - px), py + t * (y - py));
                    for d in 0..2 {
                        put(xx as usize, yy as usize + d, [31, 119, 180]);
                    }
                }
            }
            prev = Some((x, y));
        }
    }
    let png = encode_png(&img, W, H);
    peft_io::tensors::write_atomic(path, &png)
        .with_context(|| format!("writing {}", path.display()))
}
