//! Real PNG images whose colours and pattern come from a seed, so prompts are told apart.

/// Encodes a `width`×`height` RGB8 PNG drawn from `seed`; the same seed and size give the same bytes.
pub fn render(seed: &[u8; 32], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    encode(&draw(seed, width, height), width, height)
}

/// A draft of [`render`]'s picture, as a partial image shows it while it takes shape: the same
/// drawing in square blocks, finer for each later `index` (0 is the coarsest).
pub fn render_draft(
    seed: &[u8; 32],
    width: u32,
    height: u32,
    index: u32,
) -> Result<Vec<u8>, png::EncodingError> {
    let block = (width.max(height) >> (3 + index.min(16))).max(2);
    let pixels = blocky(&draw(seed, width, height), width, height, block);
    encode(&pixels, width, height)
}

/// Every `block`×`block` square takes the colour of its top-left pixel.
fn blocky(pixels: &[u8], width: u32, height: u32, block: u32) -> Vec<u8> {
    let at = |x: u32, y: u32| ((y * width + x) * 3) as usize;
    let mut out = Vec::with_capacity(pixels.len());
    for y in 0..height {
        for x in 0..width {
            let from = at(x - x % block, y - y % block);
            out.extend_from_slice(&pixels[from..from + 3]);
        }
    }
    out
}

fn encode(pixels: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::with_capacity(pixels.len() / 4);
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Speed over size: benchmarks generate many of these.
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(out)
}

/// One of four patterns (stripes, checks, rings, plaid) in two seed colours, shaded toward a third.
fn draw(seed: &[u8; 32], width: u32, height: u32) -> Vec<u8> {
    let background = [seed[0], seed[1], seed[2]];
    let mut foreground = [seed[3], seed[4], seed[5]];
    // Two near-identical colours would make the pattern invisible.
    if contrast(background, foreground) < 96 {
        foreground = background.map(|c| 255 - c);
    }
    let accent = [seed[6], seed[7], seed[8]];
    let pattern = seed[9] % 4;
    // Pattern scale follows the image size so a small and a large render look alike.
    let side = width.max(height).max(1);
    let scale = ((8 + u32::from(seed[10]) % 40) * side / 256).max(1);
    let (cx, cy) = (
        u32::from(seed[11]) * width / 256,
        u32::from(seed[12]) * height / 256,
    );
    let mut pixels = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        // Shade from nothing at the top to half accent at the bottom.
        let mix = y * 128 / height.max(1);
        for x in 0..width {
            let on = match pattern {
                0 => ((x + y) / scale).is_multiple_of(2),
                1 => (x / scale + y / scale).is_multiple_of(2),
                2 => {
                    let (dx, dy) = (x.abs_diff(cx), y.abs_diff(cy));
                    ((dx * dx + dy * dy).isqrt() / scale).is_multiple_of(2)
                }
                _ => ((x / scale) ^ (y / scale)).is_multiple_of(3),
            };
            let base = if on { foreground } else { background };
            for (b, a) in base.iter().zip(accent) {
                let value = (u32::from(*b) * (256 - mix) + u32::from(a) * mix) / 256;
                pixels.push(value as u8);
            }
        }
    }
    pixels
}

fn contrast(a: [u8; 3], b: [u8; 3]) -> u32 {
    a.iter().zip(b).map(|(x, y)| u32::from(x.abs_diff(y))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_render_is_a_decodable_png_of_the_asked_size() {
        let bytes = render(&[9; 32], 64, 32).expect("renders");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().expect("decodes");
        assert_eq!((reader.info().width, reader.info().height), (64, 32));
    }

    #[test]
    fn a_draft_is_a_decodable_png_of_the_same_size_and_coarser_than_the_picture() {
        let seed = [7; 32];
        let picture = render(&seed, 64, 48).expect("renders");
        for index in 0..3 {
            let draft = render_draft(&seed, 64, 48, index).expect("renders a draft");
            let reader = png::Decoder::new(std::io::Cursor::new(&draft))
                .read_info()
                .expect("decodes");
            assert_eq!((reader.info().width, reader.info().height), (64, 48));
            assert_ne!(draft, picture);
        }
        assert_ne!(
            render_draft(&seed, 64, 48, 0).expect("renders a draft"),
            render_draft(&seed, 64, 48, 1).expect("renders a draft")
        );
    }

    #[test]
    fn renders_are_deterministic_and_differ_by_seed() {
        assert_eq!(
            render(&[1; 32], 40, 40).expect("renders"),
            render(&[1; 32], 40, 40).expect("renders")
        );
        assert_ne!(
            render(&[1; 32], 40, 40).expect("renders"),
            render(&[2; 32], 40, 40).expect("renders")
        );
    }
}
