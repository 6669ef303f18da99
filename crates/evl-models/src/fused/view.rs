//! View passes: every output distillation reads from [`FusedLm`], and the backward pass
//! from the loss's gradients with respect to them; the signal encoder's forward and backward
//! passes; the embeddings shared with [`FusedLm::step`].

use super::kernels::{View, axpy, ln_backward, ln_forward, mm};
use super::stem::StemTape;
use super::{EncInput, EncSlots, FusedError, FusedLm, FusedStep, Group, LayerActs, Layout, LmRow};
use crate::native::exp;

/// What the encoder side of a view pass reads.
#[derive(Debug, Clone, Copy)]
pub enum ViewInput<'a> {
    /// A frozen encoder's tokens, `[records, v, d_vision]`.
    Tokens(&'a [f32]),
    /// Each record's encoder input as [`crate::vlm::EcgVlm::encode`] reads it (a signal
    /// `[leads, samples]` or a page `[height, width]`), through the encoder
    /// ([`FusedLm::with_encoder`]).
    Raw(&'a [f32]),
}

/// The outputs of a view pass, as [`crate::vlm::EcgVlm::view_layer`] returns them on a padded batch:
/// `rows` rows, `t` text positions (the longest row); positions past a row's end are zero
/// (burn computes them from padding; the losses mask them).
#[derive(Debug, Clone)]
pub struct ViewOut {
    /// Rows.
    pub rows: usize,
    /// Text positions.
    pub t: usize,
    /// Visual tokens `[rows, v, d_vision]`.
    pub visual: Vec<f32>,
    /// Hidden states at the text positions, at the layer asked `[rows, t, d]`.
    pub hidden: Vec<f32>,
    /// Next-token logits at the text positions `[rows, t, vocab]`.
    pub logits: Vec<f32>,
    /// Final hidden states at the visual positions `[rows, v, d]`.
    pub visual_hidden: Vec<f32>,
    /// The output head `[d, vocab]`.
    pub head: Vec<f32>,
}

/// Gradients of a loss with respect to a [`ViewOut`]'s tensors (`None`: the loss does not
/// read it).
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewGrads<'a> {
    /// Of `visual`.
    pub visual: Option<&'a [f32]>,
    /// Of `hidden`.
    pub hidden: Option<&'a [f32]>,
    /// Of `logits`.
    pub logits: Option<&'a [f32]>,
    /// Of `visual_hidden`.
    pub visual_hidden: Option<&'a [f32]>,
    /// Of `head`.
    pub head: Option<&'a [f32]>,
}

/// The encoder's part of a view pass, kept for its backward pass.
struct EncTape {
    lay: Layout,
    /// The patch embedding's input `[tokens, features]`.
    patches: Vec<f32>,
    stem: Option<StemTape>,
    acts: Vec<LayerActs>,
    xhat: Vec<f32>,
    inv: Vec<f32>,
}

/// What a view pass keeps for [`FusedLm::view_backward`].
pub struct ViewTape {
    lay: Layout,
    enc: Option<EncTape>,
    /// The language model's visual input per record block `[blocks * v, d_vision]`.
    vis: Vec<f32>,
    acts: Vec<LayerActs>,
    xhat_f: Vec<f32>,
    inv_f: Vec<f32>,
    hf: Vec<f32>,
    layer: Option<usize>,
    /// Per logit row: (input row, text position, the layout row it is read from).
    lsrc: Vec<(usize, usize, usize)>,
    t: usize,
}

impl std::fmt::Debug for ViewTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ViewTape({} rows, {} layers)",
            self.lay.n,
            self.acts.len()
        )
    }
}

/// What [`FusedLm::encode`] keeps for [`FusedLm::encode_backward`].
pub struct EncodeTape(EncTape);

impl std::fmt::Debug for EncodeTape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncodeTape({} tokens)", self.0.lay.n)
    }
}

impl FusedLm {
    /// The visual encoder alone on each record's input (`input[records, ...]`, signal or
    /// page, as [`crate::vlm::EcgVlm::encode`] reads it): the tokens `[records, v,
    /// d_vision]` and what the backward pass needs.
    ///
    /// # Errors
    /// A model built without its encoder, or input that is not whole records.
    pub fn encode(&self, input: &[f32]) -> Result<(Vec<f32>, EncodeTape), FusedError> {
        let enc = self.enc.as_ref().ok_or_else(|| {
            FusedError::Visual("the kernels were built without the encoder".into())
        })?;
        let per = enc.input.per_record();
        if per == 0 || input.is_empty() || !input.len().is_multiple_of(per) {
            return Err(FusedError::Visual(format!(
                "{} values are not a whole number of records of {per}",
                input.len()
            )));
        }
        let records = input.len() / per;
        let blocks: Vec<(usize, usize)> = (0..records).map(|r| (r * self.n_visual, r)).collect();
        let (tokens, tape) = self.encoder_forward(enc, &blocks, input);
        Ok((tokens, EncodeTape(tape)))
    }

    /// [`FusedLm::encode`] backwards from d loss / d tokens: the encoder's gradients (the
    /// step's `loss` is NaN: the loss was computed elsewhere).
    ///
    /// # Panics
    /// When `dtokens` is not the tokens' size.
    pub fn encode_backward(&self, tape: &EncodeTape, dtokens: &[f32]) -> FusedStep {
        let enc = self
            .enc
            .as_ref()
            .expect("a tape comes from a model with its encoder");
        assert_eq!(dtokens.len(), tape.0.lay.n * self.dv, "token gradient");
        let mut grads = vec![0.0f32; self.values.len()];
        self.encoder_backward(enc, &tape.0, dtokens, &mut grads);
        FusedStep {
            loss: f64::NAN,
            grads,
        }
    }

    /// The encoder's forward pass over each block's record: its input `data[records, ...]`
    /// (signal or page) -> tokens `[blocks * v, d_vision]`.
    fn encoder_forward(
        &self,
        enc: &EncSlots,
        blocks: &[(usize, usize)],
        data: &[f32],
    ) -> (Vec<f32>, EncTape) {
        let (v, dv) = (self.n_visual, self.dv);
        let nb = blocks.len();
        let per = enc.input.per_record();
        let mut stem_tape = None;
        let patches = match &enc.input {
            EncInput::Signal {
                leads,
                samples,
                patch,
            } => {
                let (leads, samples, patch) = (*leads, *samples, *patch);
                let pd = leads * patch;
                // Token p of a record reads window p of every lead: feature l * patch + k.
                let mut patches = vec![0.0f32; nb * v * pd];
                for (b, &(_, rec)) in blocks.iter().enumerate() {
                    let sig = &data[rec * per..(rec + 1) * per];
                    for p in 0..v {
                        let row = &mut patches[(b * v + p) * pd..(b * v + p + 1) * pd];
                        for l in 0..leads {
                            row[l * patch..(l + 1) * patch].copy_from_slice(
                                &sig[l * samples + p * patch..l * samples + (p + 1) * patch],
                            );
                        }
                    }
                }
                patches
            }
            EncInput::Image {
                width, patch, stem, ..
            } => {
                let (width, p) = (*width, *patch);
                let gw = width / p;
                let gh = v / gw.max(1);
                // The page cropped to whole patches.
                let (ch, cw) = (gh * p, gw * p);
                let mut pages = vec![0.0f32; nb * ch * cw];
                for (b, &(_, rec)) in blocks.iter().enumerate() {
                    let page = &data[rec * per..(rec + 1) * per];
                    for y in 0..ch {
                        pages[(b * ch + y) * cw..(b * ch + y + 1) * cw]
                            .copy_from_slice(&page[y * width..y * width + cw]);
                    }
                }
                match stem {
                    Some(st) => {
                        let (y, tape) = self.stem_forward(st, &pages, nb, (ch, cw));
                        stem_tape = Some(tape);
                        y
                    }
                    None => {
                        // Token (i, j) reads its square row by row: feature y * patch + x.
                        let pd = p * p;
                        let mut patches = vec![0.0f32; nb * v * pd];
                        for b in 0..nb {
                            for t in 0..v {
                                let (i, j) = (t / gw, t % gw);
                                let row = &mut patches[(b * v + t) * pd..(b * v + t + 1) * pd];
                                for y in 0..p {
                                    let src = (b * ch + i * p + y) * cw + j * p;
                                    row[y * p..(y + 1) * p].copy_from_slice(&pages[src..src + p]);
                                }
                            }
                        }
                        patches
                    }
                }
            }
        };
        let n = nb * v;
        let mut x = self.linear(enc.embed, &patches, n);
        let pos = self.p(enc.pos);
        for row in x.chunks_exact_mut(v * dv) {
            for (o, &e) in row.iter_mut().zip(pos) {
                *o += e;
            }
        }
        // Every token sees every token of its record.
        let mut lay = Layout {
            n,
            pos: Vec::new(),
            token: Vec::new(),
            blocks: (0..nb).map(|b| (b * v, b)).collect(),
            groups: Vec::new(),
            targets: Vec::new(),
            rows_at: Vec::new(),
        };
        let mut p_off = 0;
        for b in 0..nb {
            let g = Group {
                qs: b * v,
                qn: v,
                ss: b * v,
                sn: v,
                causal: false,
                p_off,
            };
            p_off += g.per_head() * enc.dims.heads;
            lay.groups.push(g);
        }
        let acts = enc
            .layers
            .iter()
            .map(|ls| self.layer_forward(ls, enc.dims, &lay, &mut x))
            .collect();
        let (xhat, inv, y) = ln_forward(&x, self.p(enc.norm.0), self.p(enc.norm.1));
        (
            y,
            EncTape {
                lay,
                patches,
                acts,
                xhat,
                inv,
                stem: stem_tape,
            },
        )
    }

    /// The encoder's backward pass from `dy`, d loss / d tokens `[blocks * v, d_vision]`.
    fn encoder_backward(&self, enc: &EncSlots, tape: &EncTape, dy: &[f32], grads: &mut [f32]) {
        let (v, dv) = (self.n_visual, self.dv);
        let n = tape.lay.n;
        let mut dx = vec![0.0f32; n * dv];
        {
            let (dg, db) = self.two_grads(grads, enc.norm.0, enc.norm.1);
            ln_backward(
                dy,
                &tape.xhat,
                &tape.inv,
                self.p(enc.norm.0),
                dg,
                db,
                &mut dx,
            );
        }
        for (ls, a) in enc.layers.iter().zip(&tape.acts).rev() {
            self.layer_backward(ls, enc.dims, &tape.lay, a, &mut dx, grads);
        }
        let s = &self.slots[enc.pos];
        let gpos = &mut grads[s.off..s.off + s.len];
        for row in dx.chunks_exact(v * dv) {
            for (o, &g) in gpos.iter_mut().zip(row) {
                *o += g;
            }
        }
        self.linear_grads(
            grads,
            enc.embed,
            &tape.patches,
            n,
            &dx,
            View::rm(n, dv, dv, 0),
        );
        if let (EncInput::Image { stem: Some(st), .. }, Some(stape)) = (&enc.input, &tape.stem) {
            let dfeat = self.linear_dx(enc.embed.0, &dx, n);
            self.stem_backward(st, stape, &dfeat, grads);
        }
    }

    /// The forward pass of [`crate::vlm::EcgVlm::view_layer`] (`input` = raw) or
    /// [`crate::vlm::EcgVlm::view_from_visual`] (`input` = tokens), with hidden states at `layer`
    /// (`None` or the number of layers: after the final norm), keeping what
    /// [`FusedLm::view_backward`] needs. Rows about the same record share its prefix.
    ///
    /// # Errors
    /// As [`FusedLm::step`], and raw input given to a model built without its encoder.
    pub fn view_forward(
        &self,
        input: ViewInput<'_>,
        rows: &[LmRow<'_>],
        layer: Option<usize>,
    ) -> Result<(ViewOut, ViewTape), FusedError> {
        let (v, d, dv, vocab) = (self.n_visual, self.d, self.dv, self.vocab);
        let n_layers = self.layers.len();
        let layer = layer.filter(|&k| k < n_layers);
        let per_record = match (input, &self.enc) {
            (ViewInput::Tokens(_), _) => v * dv,
            (ViewInput::Raw(_), Some(e)) => e.input.per_record(),
            (ViewInput::Raw(_), None) => {
                return Err(FusedError::Visual(
                    "raw input given, but the kernels were built without the encoder".into(),
                ));
            }
        };
        let data = match input {
            ViewInput::Tokens(x) | ViewInput::Raw(x) => x,
        };
        if per_record == 0 || !data.len().is_multiple_of(per_record) {
            return Err(FusedError::Visual(format!(
                "{} values are not a whole number of records of {per_record}",
                data.len()
            )));
        }
        let records = data.len() / per_record;
        let lay = self.layout(records, rows, true)?;
        let nb = lay.blocks.len();
        let (vis, enc) = match (input, &self.enc) {
            (ViewInput::Raw(sig), Some(e)) => {
                let (y, tape) = self.encoder_forward(e, &lay.blocks, sig);
                (y, Some(tape))
            }
            _ => {
                let mut vis = Vec::with_capacity(nb * v * dv);
                for &(_, rec) in &lay.blocks {
                    vis.extend_from_slice(&data[rec * v * dv..(rec + 1) * v * dv]);
                }
                (vis, None)
            }
        };
        let mut x = self.embed(&lay, &vis);
        let mut acts = Vec::with_capacity(n_layers);
        let mut at = None;
        for (i, ls) in self.layers.iter().enumerate() {
            if layer == Some(i) {
                at = Some(x.clone());
            }
            acts.push(self.layer_forward(ls, self.lm_dims(), &lay, &mut x));
        }
        let (ng, nbeta) = self.norm;
        let (xhat_f, inv_f, hf) = ln_forward(&x, self.p(ng), self.p(nbeta));
        let b = rows.len();
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let mut out = ViewOut {
            rows: b,
            t,
            visual: vec![0.0; b * v * dv],
            hidden: vec![0.0; b * t * d],
            logits: vec![0.0; b * t * vocab],
            visual_hidden: vec![0.0; b * v * d],
            head: self.p(self.head).to_vec(),
        };
        let block_of = |start: usize| lay.blocks.iter().position(|&(s, _)| s == start);
        let mut lsrc = Vec::new();
        for (r, &(start, qs, len)) in lay.rows_at.iter().enumerate() {
            let bi = block_of(start).expect("every row has a block");
            out.visual[r * v * dv..(r + 1) * v * dv]
                .copy_from_slice(&vis[bi * v * dv..(bi + 1) * v * dv]);
            out.visual_hidden[r * v * d..(r + 1) * v * d]
                .copy_from_slice(&hf[start * d..(start + v) * d]);
            let src = at.as_ref().unwrap_or(&hf);
            out.hidden[r * t * d..(r * t + len) * d].copy_from_slice(&src[qs * d..(qs + len) * d]);
            // Position v - 1 + i predicts token i; the last real position predicts the
            // token after the row (a real value in burn's padded batch too).
            for i in 0..t.min(len + 1) {
                lsrc.push((r, i, if i == 0 { start + v - 1 } else { qs + i - 1 }));
            }
        }
        let m = lsrc.len();
        let mut hsrc = vec![0.0f32; m * d];
        for (k, &(_, _, src)) in lsrc.iter().enumerate() {
            hsrc[k * d..(k + 1) * d].copy_from_slice(&hf[src * d..(src + 1) * d]);
        }
        let mut logits = vec![0.0f32; m * vocab];
        mm(
            &mut logits,
            View::rm(m, vocab, vocab, 0),
            &hsrc,
            View::rm(m, d, d, 0),
            self.p(self.head),
            View::rm(d, vocab, vocab, 0),
            false,
        );
        for (k, &(r, i, _)) in lsrc.iter().enumerate() {
            out.logits[(r * t + i) * vocab..(r * t + i + 1) * vocab]
                .copy_from_slice(&logits[k * vocab..(k + 1) * vocab]);
        }
        let tape = ViewTape {
            lay,
            enc,
            vis,
            acts,
            xhat_f,
            inv_f,
            hf,
            layer,
            lsrc,
            t,
        };
        Ok((out, tape))
    }

    /// The backward pass of [`FusedLm::view_forward`]: the gradient of every parameter from
    /// the loss's gradients with respect to the outputs (the returned step's `loss` is NaN:
    /// the loss was computed elsewhere).
    ///
    /// # Panics
    /// When a gradient's length is not its output's.
    pub fn view_backward(&self, tape: &ViewTape, g: ViewGrads<'_>) -> FusedStep {
        let (v, d, dv, vocab) = (self.n_visual, self.d, self.dv, self.vocab);
        let lay = &tape.lay;
        let (n, t) = (lay.n, tape.t);
        let b = lay.rows_at.len();
        let mut grads = vec![0.0f32; self.values.len()];
        let mut dhf = vec![0.0f32; n * d];
        if let Some(gl) = g.logits {
            assert_eq!(gl.len(), b * t * vocab, "logits gradient");
            let m = tape.lsrc.len();
            let mut dl = vec![0.0f32; m * vocab];
            let mut hsrc = vec![0.0f32; m * d];
            for (k, &(r, i, src)) in tape.lsrc.iter().enumerate() {
                dl[k * vocab..(k + 1) * vocab]
                    .copy_from_slice(&gl[(r * t + i) * vocab..(r * t + i + 1) * vocab]);
                hsrc[k * d..(k + 1) * d].copy_from_slice(&tape.hf[src * d..(src + 1) * d]);
            }
            let s = &self.slots[self.head];
            mm(
                &mut grads[s.off..s.off + s.len],
                View::rm(d, vocab, vocab, 0),
                &hsrc,
                View::rm(m, d, d, 0).t(),
                &dl,
                View::rm(m, vocab, vocab, 0),
                false,
            );
            let mut dsrc = vec![0.0f32; m * d];
            mm(
                &mut dsrc,
                View::rm(m, d, d, 0),
                &dl,
                View::rm(m, vocab, vocab, 0),
                self.p(self.head),
                View::rm(d, vocab, vocab, 0).t(),
                false,
            );
            for (k, &(_, _, src)) in tape.lsrc.iter().enumerate() {
                axpy(
                    &mut dhf[src * d..(src + 1) * d],
                    1.0,
                    &dsrc[k * d..(k + 1) * d],
                );
            }
        }
        if let Some(gh) = g.head {
            let s = &self.slots[self.head];
            axpy(&mut grads[s.off..s.off + s.len], 1.0, gh);
        }
        if let Some(gv) = g.visual_hidden {
            assert_eq!(gv.len(), b * v * d, "visual_hidden gradient");
            for (r, &(start, _, _)) in lay.rows_at.iter().enumerate() {
                axpy(
                    &mut dhf[start * d..(start + v) * d],
                    1.0,
                    &gv[r * v * d..(r + 1) * v * d],
                );
            }
        }
        let add_hidden = |dx: &mut [f32], gh: &[f32]| {
            assert_eq!(gh.len(), b * t * d, "hidden gradient");
            for (r, &(_, qs, len)) in lay.rows_at.iter().enumerate() {
                axpy(
                    &mut dx[qs * d..(qs + len) * d],
                    1.0,
                    &gh[r * t * d..(r * t + len) * d],
                );
            }
        };
        if tape.layer.is_none()
            && let Some(gh) = g.hidden
        {
            add_hidden(&mut dhf, gh);
        }
        let mut dx = vec![0.0f32; n * d];
        {
            let (ng, nbeta) = self.norm;
            let (dg, db) = self.two_grads(&mut grads, ng, nbeta);
            ln_backward(&dhf, &tape.xhat_f, &tape.inv_f, self.p(ng), dg, db, &mut dx);
        }
        for (i, (ls, a)) in self.layers.iter().zip(&tape.acts).enumerate().rev() {
            self.layer_backward(ls, self.lm_dims(), lay, a, &mut dx, &mut grads);
            if tape.layer == Some(i)
                && let Some(gh) = g.hidden
            {
                add_hidden(&mut dx, gh);
            }
        }
        let dvis = self.embed_backward(lay, &tape.vis, &dx, &mut grads);
        if let (Some(enc), Some(et)) = (&self.enc, &tape.enc)
            && enc.train
        {
            let mut dvis = dvis;
            if let Some(gv) = g.visual {
                assert_eq!(gv.len(), b * v * dv, "visual gradient");
                for (r, &(start, _, _)) in lay.rows_at.iter().enumerate() {
                    let bi = lay
                        .blocks
                        .iter()
                        .position(|&(s, _)| s == start)
                        .expect("every row has a block");
                    axpy(
                        &mut dvis[bi * v * dv..(bi + 1) * v * dv],
                        1.0,
                        &gv[r * v * dv..(r + 1) * v * dv],
                    );
                }
            }
            self.encoder_backward(enc, et, &dvis, &mut grads);
        }
        FusedStep {
            loss: f64::NAN,
            grads,
        }
    }

    /// The SFT loss of a batch and its gradients with the encoder learning too: `input`
    /// (each record's signal or page) through the encoder ([`FusedLm::with_encoder`]), then
    /// [`FusedLm::view_forward`], the answer-token cross-entropy and
    /// [`FusedLm::view_backward`] (which skips the encoder's backward pass when none of its
    /// parameters learns; [`FusedLm::step`] on cached tokens is faster then).
    ///
    /// # Errors
    /// As [`FusedLm::view_forward`], and a batch without answer tokens.
    pub fn step_from_input(
        &self,
        input: &[f32],
        rows: &[LmRow<'_>],
    ) -> Result<FusedStep, FusedError> {
        let (out, tape) = self.view_forward(ViewInput::Raw(input), rows, None)?;
        let (t, vocab) = (out.t, self.vocab);
        let m = rows
            .iter()
            .map(|r| r.answer.iter().filter(|&&a| a).count())
            .sum::<usize>();
        if m == 0 {
            return Err(FusedError::NoAnswer);
        }
        let inv_m = 1.0 / m as f32;
        let mut dl = vec![0.0f32; out.logits.len()];
        let mut loss = 0.0f64;
        for (r, row) in rows.iter().enumerate() {
            for (i, (&id, _)) in row
                .ids
                .iter()
                .zip(row.answer)
                .enumerate()
                .filter(|x| *x.1.1)
            {
                let z = &out.logits[(r * t + i) * vocab..(r * t + i + 1) * vocab];
                let g = &mut dl[(r * t + i) * vocab..(r * t + i + 1) * vocab];
                let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0.0f32;
                for (o, &v) in g.iter_mut().zip(z) {
                    *o = exp(v - max);
                    sum += *o;
                }
                let target = id as usize;
                loss += f64::from(sum.ln()) - f64::from(g[target].ln());
                let k = inv_m / sum;
                g.iter_mut().for_each(|o| *o *= k);
                g[target] -= inv_m;
            }
        }
        let mut step = self.view_backward(
            &tape,
            ViewGrads {
                logits: Some(&dl),
                ..ViewGrads::default()
            },
        );
        step.loss = loss / m as f64;
        Ok(step)
    }

    /// The decoder's input: projected visual tokens `vis[blocks * v, d_vision]` at each
    /// block's visual rows, token embeddings at text rows, plus positions.
    pub(super) fn embed(&self, lay: &Layout, vis: &[f32]) -> Vec<f32> {
        let (v, d) = (self.n_visual, self.d);
        let nb = lay.blocks.len();
        let proj = self.linear(self.projector, vis, nb * v);
        let mut x = vec![0.0f32; lay.n * d];
        for (b, &(start, _)) in lay.blocks.iter().enumerate() {
            x[start * d..(start + v) * d].copy_from_slice(&proj[b * v * d..(b + 1) * v * d]);
        }
        let (emb, pos) = (self.p(self.tok_emb), self.p(self.pos));
        for r in 0..lay.n {
            let xr = &mut x[r * d..(r + 1) * d];
            if let Some(t) = lay.token[r] {
                xr.copy_from_slice(&emb[t * d..(t + 1) * d]);
            }
            let p = lay.pos[r];
            for (o, &e) in xr.iter_mut().zip(&pos[p * d..(p + 1) * d]) {
                *o += e;
            }
        }
        x
    }

    /// [`FusedLm::embed`] backwards: position, token embedding and projector gradients from
    /// `dx`; returns d loss / d `vis`.
    pub(super) fn embed_backward(
        &self,
        lay: &Layout,
        vis: &[f32],
        dx: &[f32],
        grads: &mut [f32],
    ) -> Vec<f32> {
        let (v, d, dv) = (self.n_visual, self.d, self.dv);
        {
            let s = &self.slots[self.pos];
            let gpos = &mut grads[s.off..s.off + s.len];
            for r in 0..lay.n {
                let p = lay.pos[r];
                axpy(&mut gpos[p * d..(p + 1) * d], 1.0, &dx[r * d..(r + 1) * d]);
            }
        }
        {
            let s = &self.slots[self.tok_emb];
            let gemb = &mut grads[s.off..s.off + s.len];
            for r in 0..lay.n {
                if let Some(t) = lay.token[r] {
                    axpy(&mut gemb[t * d..(t + 1) * d], 1.0, &dx[r * d..(r + 1) * d]);
                }
            }
        }
        let nb = lay.blocks.len();
        let mut dproj = vec![0.0f32; nb * v * d];
        for (b, &(start, _)) in lay.blocks.iter().enumerate() {
            dproj[b * v * d..(b + 1) * v * d].copy_from_slice(&dx[start * d..(start + v) * d]);
        }
        self.linear_grads(
            grads,
            self.projector,
            vis,
            nb * v,
            &dproj,
            View::rm(nb * v, d, d, 0),
        );
        if self.enc.as_ref().is_some_and(|e| e.train) {
            self.linear_dx(self.projector.0, &dproj, nb * v)
        } else {
            vec![0.0f32; nb * v * dv]
        }
    }
}
