//! The quantisation types of Gemma-3-270M's Q4_K_M GGUF (Q4_K, Q5_0, Q6_K, Q8_0) through the dequantiser that
//! `load_gguf` uses ([`slm_model::gguf::dequantize_raw`] / [`slm_model::gguf::dequantize_qtensor`]), against an
//! independent decoding of ggml's block layouts written here element by element, on hand-built and random blocks;
//! then a few tensors of the real file against values from the `gguf` Python package's numpy dequantiser.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use half::f16;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use slm_model::gguf::dequantize_raw;
use slm_model::testing::workspace_root;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn put_f16(b: &mut [u8], at: usize, x: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(x).to_le_bytes());
}

/// Q8_0 (34 bytes for 32 values): `d: f16`, then 32 `i8`; value j = d * q[j].
fn ref_q8_0(b: &[u8], j: usize) -> f32 {
    f16_at(b, 0) * (b[2 + j] as i8) as f32
}

/// Q5_0 (22 bytes for 32 values): `d: f16`, `qh: u32` (little-endian; bit j is value j's fifth bit), 16 bytes of
/// nibbles (values 0..16 in the low nibbles, 16..32 in the high ones); value j = d * (q5 - 16).
fn ref_q5_0(b: &[u8], j: usize) -> f32 {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let byte = b[6 + j % 16];
    let low4 = if j < 16 { byte & 0x0F } else { byte >> 4 };
    let q5 = (low4 as i32) | ((((qh >> j) & 1) as i32) << 4);
    f16_at(b, 0) * (q5 - 16) as f32
}

/// Q4_K's 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes: sub-blocks 0..4 in the low six bits
/// of bytes j and j+4; 4..8 in the nibbles of byte j+4 with their top two bits in the top bits of bytes j-4 and j.
fn q4k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        ((sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
    }
}

/// Q4_K (144 bytes for 256 values): `d: f16`, `dmin: f16`, 12 bytes of packed scales/mins, 128 bytes of nibbles.
/// Value i lies in sub-block i/32; the 64 values of chunk i/64 share 32 bytes (low nibbles first, then high).
/// Value = d * scale * q - dmin * min.
fn ref_q4_k(b: &[u8], i: usize) -> f32 {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let sub = i / 32;
    let byte = b[16 + (i / 64) * 32 + i % 32];
    let q = if sub % 2 == 1 { byte >> 4 } else { byte & 0x0F };
    let (scale, min) = q4k_scale_min(&b[4..16], sub);
    d * scale as f32 * q as f32 - dmin * min as f32
}

/// Q6_K (210 bytes for 256 values): 128 bytes `ql` (low four bits), 64 bytes `qh` (high two bits), 16 `i8` scales,
/// then `d: f16`. Each half of 128 values uses 64 bytes of ql and 32 of qh; within a half, quarter k (32 values)
/// takes ql's low nibbles (k = 0, 1) or high nibbles (k = 2, 3) of bytes l + 32 (k mod 2), and bits 2k..2k+2 of
/// qh byte l; the scale is that of its 16 values. Value = d * scale * (q6 - 32).
fn ref_q6_k(b: &[u8], i: usize) -> f32 {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    let (half, r) = (i / 128, i % 128);
    let (k, l) = (r / 32, r % 32);
    let lbyte = ql[half * 64 + l + 32 * (k % 2)];
    let low4 = if k < 2 { lbyte & 0x0F } else { lbyte >> 4 };
    let hi2 = (qh[half * 32 + l] >> (2 * k)) & 3;
    let q6 = (low4 | (hi2 << 4)) as i32 - 32;
    let scale = scales[half * 8 + 2 * k + l / 16] as i8;
    d * scale as f32 * q6 as f32
}

struct Layout {
    dtype: GgmlDType,
    block_bytes: usize,
    block_values: usize,
    reference: fn(&[u8], usize) -> f32,
    /// Where the f16 factors of a block lie (so random bytes get sane, finite ones).
    f16_fields: &'static [usize],
}

const LAYOUTS: [Layout; 4] = [
    Layout { dtype: GgmlDType::Q8_0, block_bytes: 34, block_values: 32, reference: ref_q8_0, f16_fields: &[0] },
    Layout { dtype: GgmlDType::Q5_0, block_bytes: 22, block_values: 32, reference: ref_q5_0, f16_fields: &[0] },
    Layout { dtype: GgmlDType::Q4K, block_bytes: 144, block_values: 256, reference: ref_q4_k, f16_fields: &[0, 2] },
    Layout { dtype: GgmlDType::Q6K, block_bytes: 210, block_values: 256, reference: ref_q6_k, f16_fields: &[208] },
];

fn dequant(dtype: GgmlDType, raw: &[u8], dims: &[usize]) -> Vec<f32> {
    dequantize_raw(dtype, raw, dims, "test", Path::new("test.gguf")).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn close(got: f32, want: f32) -> bool {
    (got - want).abs() <= 1e-6 * want.abs().max(1.0)
}

#[test]
fn layouts_match_the_block_sizes_candle_reports() {
    for l in &LAYOUTS {
        assert_eq!((l.dtype.type_size(), l.dtype.block_size()), (l.block_bytes, l.block_values), "{:?}", l.dtype);
    }
}

/// One block per type with bytes chosen by hand and values worked out on paper, so that the reference decoders
/// above are themselves checked.
#[test]
fn hand_built_blocks() {
    // Q8_0: d = 0.5, q[0] = -3, q[31] = 127.
    let mut b = vec![0u8; 34];
    put_f16(&mut b, 0, 0.5);
    b[2] = (-3i8) as u8;
    b[33] = 127;
    let v = dequant(GgmlDType::Q8_0, &b, &[32]);
    assert_eq!((v[0], v[1], v[31]), (-1.5, 0.0, 63.5));

    // Q5_0: d = 2, qh bits 0 and 16 set, qs[0] = 0x3F: value 0 = (15 | 16) - 16 = 15, value 16 = (3 | 16) - 16 = 3,
    // value 1 = 0 - 16.
    let mut b = vec![0u8; 22];
    put_f16(&mut b, 0, 2.0);
    b[2..6].copy_from_slice(&(1u32 | (1 << 16)).to_le_bytes());
    b[6] = 0x3F;
    let v = dequant(GgmlDType::Q5_0, &b, &[32]);
    assert_eq!((v[0], v[16], v[1], v[17]), (30.0, 6.0, -32.0, -32.0));

    // Q4_K: d = 1, dmin = 0.5. Sub-block 0: scale 2, min 3 (bytes 0 and 4, low six bits); sub-block 1: scale 1,
    // min 0; sub-block 4: scale (byte 8 low nibble 5) | (byte 0 top bits 1) << 4 = 21, min (byte 8 high nibble 2)
    // | (byte 4 top bits 0) << 4 = 2.
    let mut b = vec![0u8; 144];
    put_f16(&mut b, 0, 1.0);
    put_f16(&mut b, 2, 0.5);
    b[4] = 0x42; // scale 0 = 2, top bits 1
    b[5] = 1; // scale 1 = 1
    b[8] = 3; // min 0 = 3
    b[12] = 0x25; // sub-block 4: scale nibble 5, min nibble 2
    b[16] = 0x7A; // value 0: low nibble 10 (sub-block 0); value 32: high nibble 7 (sub-block 1)
    b[16 + 64] = 0x03; // value 128 (chunk 2, sub-block 4): low nibble 3
    let v = dequant(GgmlDType::Q4K, &b, &[256]);
    assert_eq!((v[0], v[32], v[128], v[1]), (2.0 * 10.0 - 1.5, 7.0, 21.0 * 3.0 - 1.0, -1.5));

    // Q6_K: d = 0.25; ql[0] = 0x21, ql[32] = 0x0F, qh[0] = 0b11_10_01_00, scales 0, 2, 4, 6 = 2, -1, 3, 1.
    // value 0: (1 | 0 << 4) - 32 = -31, scale 2; value 32: (15 | 1 << 4) - 32 = -1, scale -1;
    // value 64: (2 | 2 << 4) - 32 = 2, scale 3; value 96: (0 | 3 << 4) - 32 = 16, scale 1.
    let mut b = vec![0u8; 210];
    b[0] = 0x21;
    b[32] = 0x0F;
    b[128] = 0b1110_0100;
    b[192] = 2;
    b[194] = (-1i8) as u8;
    b[196] = 3;
    b[198] = 1;
    put_f16(&mut b, 208, 0.25);
    let v = dequant(GgmlDType::Q6K, &b, &[256]);
    assert_eq!((v[0], v[32], v[64], v[96]), (-15.5, 0.25, 1.5, 4.0));
}

/// Random blocks (several per row, several rows) against the reference decoders, value by value.
#[test]
fn random_blocks_match_the_reference_layouts() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for l in &LAYOUTS {
        let (rows, cols) = (3usize, 2 * l.block_values);
        let blocks = rows * cols / l.block_values;
        let mut raw = vec![0u8; blocks * l.block_bytes];
        rng.fill_bytes(&mut raw);
        for (k, block) in raw.chunks_mut(l.block_bytes).enumerate() {
            for (f, &at) in l.f16_fields.iter().enumerate() {
                // Finite factors of either sign and a few magnitudes.
                let x = (0.001 + 0.0137 * (k + 3 * f) as f32) * if (k + f) % 3 == 0 { -1.0 } else { 1.0 };
                put_f16(block, at, x);
            }
        }
        let got = dequant(l.dtype, &raw, &[rows, cols]);
        assert_eq!(got.len(), rows * cols);
        let mut nonzero = 0;
        for (i, &g) in got.iter().enumerate() {
            let block = &raw[(i / l.block_values) * l.block_bytes..][..l.block_bytes];
            let want = (l.reference)(block, i % l.block_values);
            assert!(close(g, want), "{:?} value {i}: dequantised {g}, layout says {want}", l.dtype);
            nonzero += (want != 0.0) as usize;
        }
        assert!(nonzero > got.len() / 2, "{:?}: too few non-zero values to tell layouts apart", l.dtype);
    }
}

#[test]
fn bad_raw_data_is_an_error_not_a_panic() {
    let p = Path::new("test.gguf");
    let e = dequantize_raw(GgmlDType::Q4K, &[0u8; 143], &[256], "blk.0.attn_output.weight", p).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("blk.0.attn_output.weight") && msg.contains("test.gguf") && msg.contains("144"), "{msg}");
    let e = dequantize_raw(GgmlDType::Q6K, &[0u8; 210], &[2, 128], "t", p).unwrap_err();
    assert!(e.to_string().contains("whole"), "{e}");
    let e = dequantize_raw(GgmlDType::Q8_0, &[], &[usize::MAX, 64], "t", p).unwrap_err();
    assert!(e.to_string().contains("whole"), "{e}");
    // A non-finite factor is refused by the finiteness check that loading applies.
    let mut b = vec![0u8; 34];
    put_f16(&mut b, 0, f32::INFINITY);
    b[2] = 1;
    assert!(dequantize_raw(GgmlDType::Q8_0, &b, &[32], "t", p).is_err());
}

/// Tensors of the real Gemma-3-270M GGUF: their type, and values and sums from the `gguf` Python package
/// (`gguf.quants.dequantize`, numpy; f64 sums of the f32 values). Every tensor but the 262144 x 640 embedding
/// (Q8_0, as blk.0.attn_v is) is dequantised and checked finite.
#[test]
fn gemma_tensors_match_gguf_py() {
    let path = workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(path.is_file(), "Gemma-3-270M not found at {}: run `scripts/setup.sh` first", path.display());
    let (content, mut reader) = slm_model::gguf::read_content(&path).unwrap();
    // The f32 values as Python prints them (f64 literals: exact for an f32).
    type Expect = (&'static str, GgmlDType, [usize; 2], [f64; 4], f64, f64, f64);
    let expected: [Expect; 4] = [
        (
            "blk.0.attn_k.weight",
            GgmlDType::Q5_0,
            [256, 640],
            [0.0, -0.027557373046875, 0.011810302734375, -0.027557373046875],
            0.0240478515625,
            32.07246398925781,
            4768.729293823242,
        ),
        (
            "blk.0.attn_output.weight",
            GgmlDType::Q4K,
            [640, 1024],
            [-0.015705108642578125, 0.04966926574707031, -0.03749656677246094, 0.06056499481201172],
            -0.011407613754272461,
            -1.8330761790275574,
            18307.241332113743,
        ),
        (
            "blk.0.attn_v.weight",
            GgmlDType::Q8_0,
            [256, 640],
            [0.0060882568359375, -0.03957366943359375, -0.03145599365234375, -0.05682373046875],
            -0.05296611785888672,
            1.5544872283935547,
            5098.4886202812195,
        ),
        (
            "blk.0.ffn_down.weight",
            GgmlDType::Q6K,
            [640, 2048],
            [0.0052117109298706055, 0.02171546220779419, -0.02518993616104126, 0.013897895812988281],
            -0.00941401720046997,
            6.480193614959717,
            21698.13850414753,
        ),
    ];
    for (name, dtype, dims, first, last, sum, abs_sum) in expected {
        let q = content.tensor(&mut reader, name, &candle_core::Device::Cpu).unwrap();
        assert_eq!(q.dtype(), dtype, "{name}");
        let t = slm_model::gguf::dequantize_qtensor(&q, name, &path).unwrap();
        assert_eq!(t.dims(), dims, "{name}");
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        for (j, (&g, &w)) in v.iter().zip(&first).enumerate() {
            assert!(close(g, w as f32), "{name}[{j}]: {g} vs {w}");
        }
        assert!(close(*v.last().unwrap(), last as f32), "{name} last value");
        let s: f64 = v.iter().map(|&x| x as f64).sum();
        let a: f64 = v.iter().map(|&x| (x as f64).abs()).sum();
        assert!((s - sum).abs() < 1e-6 * abs_sum && (a - abs_sum).abs() < 1e-9 * abs_sum, "{name}: sums {s} {a}");
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().filter(|n| *n != "token_embd.weight").collect();
    names.sort();
    assert_eq!(names.len(), 235);
    for name in names {
        let q = content.tensor(&mut reader, name, &candle_core::Device::Cpu).unwrap();
        slm_model::gguf::dequantize_qtensor(&q, name, &path).unwrap();
    }
}
