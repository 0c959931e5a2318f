//! A drawing backend that forwards everything to another one but lays out and rasterises text itself, with
//! ab_glyph and the shipped font: plotters 0.3's own ab_glyph text drops every glyph's left side bearing
//! ("e" runs into "m", "l" stands apart from "a") and sits a fifth of the font size above its layout box.

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind};

/// `inner` with text drawn in `font`, whatever family a text style names.
pub(crate) struct Typeset<B> {
    inner: B,
    font: FontRef<'static>,
}

impl<B> Typeset<B> {
    pub(crate) fn new(inner: B, font: FontRef<'static>) -> Self {
        Self { inner, font }
    }

    /// `(width, ascent, descent)` in pixels of `text` at `size` (descent ≤ 0); the box is `ascent − descent`
    /// high whatever the glyphs, so labels of one size line up.
    fn metrics(&self, text: &str, size: f64) -> (f32, f32, f32) {
        let font = self.font.as_scaled(PxScale::from(size as f32));
        let mut width = 0.0;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                width += font.kern(p, id);
            }
            width += font.h_advance(id);
            prev = Some(id);
        }
        (width, font.ascent(), font.descent())
    }
}

type Res<E> = Result<(), DrawingErrorKind<E>>;

impl<B: DrawingBackend> DrawingBackend for Typeset<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Res<B::ErrorType> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Res<B::ErrorType> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Res<B::ErrorType> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(&mut self, from: BackendCoord, to: BackendCoord, style: &S) -> Res<B::ErrorType> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Res<B::ErrorType> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Res<B::ErrorType> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Res<B::ErrorType> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Res<B::ErrorType> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Res<B::ErrorType> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<B::ErrorType>> {
        let (w, ascent, descent) = self.metrics(text, style.size());
        Ok((w.ceil() as u32, (ascent - descent).ceil() as u32))
    }

    fn draw_text<S: BackendTextStyle>(&mut self, text: &str, style: &S, pos: BackendCoord) -> Res<B::ErrorType> {
        let colour = style.color();
        if colour.alpha == 0.0 || text.is_empty() {
            return Ok(());
        }
        let size = style.size();
        let (width, ascent, descent) = self.metrics(text, size);
        // Offsets of the unrotated text box from the anchor.
        let dx = match style.anchor().h_pos {
            HPos::Left => 0.0,
            HPos::Center => -width / 2.0,
            HPos::Right => -width,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0.0,
            VPos::Center => -(ascent - descent) / 2.0,
            VPos::Bottom => -(ascent - descent),
        };
        let baseline = dy + ascent;
        let trans = style.transform();
        let font = self.font.as_scaled(PxScale::from(size as f32));
        let mut caret = dx;
        let mut prev = None;
        let mut coverage: Vec<(i32, i32, f32)> = Vec::new();
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                caret += font.kern(p, id);
            }
            prev = Some(id);
            let glyph = id.with_scale_and_position(font.scale(), ab_glyph::point(caret, baseline));
            if let Some(outline) = font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|x, y, c| {
                    coverage.push((b.min.x as i32 + x as i32, b.min.y as i32 + y as i32, c));
                });
            }
            caret += font.h_advance(id);
        }
        let (w, h) = self.inner.get_size();
        for (x, y, c) in coverage {
            if c <= 0.0 {
                continue;
            }
            let (x, y) = trans.transform(x, y);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                let alpha = colour.alpha * c.min(1.0) as f64;
                self.inner.draw_pixel((x, y), BackendColor { alpha, rgb: colour.rgb })?;
            }
        }
        Ok(())
    }
}
