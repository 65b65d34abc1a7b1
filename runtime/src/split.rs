//! Choosing, per batch, the exit after which a head forwards its survivors (`--partition auto`).
//!
//! A head that holds exits E1..EK can hand a batch over after any of the exits it runs as a
//! group end (an exit that can answer, or EK): the cloud serves a tail for every cut. Which cut
//! answers a batch soonest depends on the link and the traffic, so the [`SplitPlanner`] keeps
//! moving estimates of every term and picks, for each batch of n samples, the cut c minimising
//!
//! ```text
//! head     = Σ_{groups up to c} compute_g(n · reach_g)               (measured per group)
//! transfer = n · S_c · bytes_c / throughput                          (per forwarded sample)
//! cloud    = P(any survivor) · server_c(fixed) + n · S_c · server_c(per sample)
//! E[time]  = max(head, transfer, cloud) + P(any survivor) · rtt
//! ```
//!
//! The three stages work on different batches at once (the head runs the next batch while the
//! previous one travels), so under load the slowest stage sets the pace; the round trip adds to
//! every answer.
//!
//! where reach_g and S_c come from the recent share of samples leaving at each exit (local exits
//! are seen by the runner; deeper ones from the exit the cloud answered at), compute_g is a
//! least-squares line over recent (rows, seconds) of that group, rtt and throughput a
//! least-squares line over the recent forwards' (bytes sent, network seconds), bytes_c the
//! recent bytes sent per sample at cut c (after compression), and server_c a line over the
//! cloud's reported server time at that cut.
//!
//! Exploration: the first batch goes to the deepest cut, which measures every group's compute
//! and every cut tensor's size. A cut not yet tried is tried once, and a cut not used for
//! [`STALE_AFTER`] batches is probed once, only if what is known of it (its bytes from its
//! tensor's size and the wire's bytes per value, no server time yet) puts it within
//! `EXPLORE_MARGIN` of the best cut tried: on a slow link a try of a shallow cut costs several
//! batches. The link's estimate is shared by all cuts, so a link that changes moves the choice
//! at once, without probes. The current cut is left only for one clearly faster (`HYSTERESIS`).
//! Decisions that change the cut are logged.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Batches after which a cut not chosen is probed again.
pub const STALE_AFTER: u64 = 200;
/// Tries of each cut before the planner trusts its estimates. One: the shallower groups' compute
/// and the link are measured on every batch anyway, and each try of a cut that is not the best
/// costs time (6 tries of a 7-exit model are a tenth of a 1,000-sample run).
const EXPLORE_TRIES: u64 = 1;
/// How much slower than the best cut tried (a fraction) a cut may look and still be tried or
/// probed.
const EXPLORE_MARGIN: f64 = 0.25;
/// Batches after which the planner explores even though no forward has measured the link yet
/// (every sample left before the deepest cut: forwarding there costs nothing, but a shallower
/// cut may still save compute).
const BLIND_BATCHES: u64 = 32;
/// Recent observations kept per estimate.
const WINDOW: usize = 48;

/// How much faster (a fraction of the current cut's expected time) another cut must look before
/// the planner leaves the current one. Two cuts within a few percent of each other are a tie
/// that noisy measurements would otherwise decide afresh every few batches, and each move
/// costs: the estimates of a cut not in use age, and batches in flight at the old cut queue
/// with the new.
const HYSTERESIS: f64 = 0.04;

/// Why a batch was cut where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The lowest expected time.
    Best,
    /// A cut not yet tried enough.
    Explore,
    /// A cut whose estimates have gone stale.
    Probe,
    /// Fixed by the caller (a static partition).
    Fixed,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Best => "best",
            Reason::Explore => "explore",
            Reason::Probe => "probe",
            Reason::Fixed => "fixed",
        }
    }
}

/// Weight of a point one observation older than the next (a half-life of about 10 points).
const RECENCY: f64 = 0.93;
/// Points among which a line without spread in x looks for its smallest y.
const RECENT_MIN: usize = 10;

/// A least-squares line y = a + b·x over a window of recent points, the recent ones weighing
/// most.
#[derive(Debug, Clone, Default)]
struct Line {
    points: VecDeque<(f64, f64)>,
    /// The fit of the current window.
    fitted: Option<(f64, f64)>,
    /// The last fit whose window had enough spread in x to separate a from b.
    separated: Option<(f64, f64)>,
}

impl Line {
    fn push(&mut self, x: f64, y: f64) {
        if !(x.is_finite() && y.is_finite()) {
            return;
        }
        if self.points.len() == WINDOW {
            self.points.pop_front();
        }
        self.points.push_back((x, y));
        self.fitted = self.refit();
    }

    /// (a, b) with a, b ≥ 0. A window with too little spread in x to separate the two (a link
    /// used at one cut with full batches) keeps the last separated fit's proportions, scaled to
    /// the points seen: a link that got slower or faster moves the estimate at once. With no
    /// separated fit yet, the fixed part is taken as half the smallest y.
    fn refit(&mut self) -> Option<(f64, f64)> {
        let len = self.points.len();
        if len == 0 {
            return None;
        }
        // Weighted by recency: a link or a cloud that changed shows within a few batches
        // instead of after half the window has turned over.
        let weighted = || self.points.iter().enumerate().map(|(i, &(x, y))| (RECENCY.powi((len - 1 - i) as i32), x, y));
        let (w, sx, sy) = weighted().fold((0.0, 0.0, 0.0), |(w, a, b), (k, x, y)| (w + k, a + k * x, b + k * y));
        let (mx, my) = (sx / w, sy / w);
        let (sxx, sxy) =
            weighted().fold((0.0, 0.0), |(a, b), (k, x, y)| (a + k * (x - mx) * (x - mx), b + k * (x - mx) * (y - my)));
        let n = w;
        if len >= 3 && mx > 0.0 && sxx > (0.05 * mx).powi(2) * n {
            let b = sxy / sxx;
            let a = my - b * mx;
            if b >= 0.0 && a >= 0.0 {
                self.separated = Some((a, b));
                return Some((a, b));
            }
            if b >= 0.0 {
                return Some((0.0, my / mx));
            }
        }
        if let Some((a, b)) = self.separated {
            let predicted = a + b * mx;
            if predicted > 0.0 {
                let k = my / predicted;
                return Some((a * k, b * k));
            }
        }
        // The smallest of the recent points only: an old low point would hold the estimate down.
        let min_y = self.points.iter().rev().take(RECENT_MIN).map(|p| p.1).fold(f64::INFINITY, f64::min);
        let a = (min_y / 2.0).min(my).max(0.0);
        let b = if mx > 0.0 { ((my - a) / mx).max(0.0) } else { 0.0 };
        Some((a, b))
    }

    fn fit(&self) -> Option<(f64, f64)> {
        self.fitted
    }

    fn predict(&self, x: f64) -> Option<f64> {
        self.fit().map(|(a, b)| a + b * x)
    }
}

/// A mean with the same recency weights as [`Line`].
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    weight: f64,
    sum: f64,
}

impl Mean {
    fn push(&mut self, v: f64) {
        if v.is_finite() {
            self.weight = self.weight * RECENCY + 1.0;
            self.sum = self.sum * RECENCY + v;
        }
    }

    fn get(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.sum / self.weight)
    }
}

/// A decayed share: events out of trials, recent ones weighing most.
#[derive(Debug, Clone, Copy, Default)]
struct Share {
    hits: f64,
    trials: f64,
}

impl Share {
    fn add(&mut self, hits: f64, trials: f64) {
        // Forgets with a half-life of about 700 samples, so a change of traffic shows within a
        // few dozen batches.
        let keep = 0.999f64.powf(trials);
        self.hits = self.hits * keep + hits;
        self.trials = self.trials * keep + trials;
    }

    fn get(&self) -> f64 {
        if self.trials > 0.0 {
            self.hits / self.trials
        } else {
            0.0
        }
    }
}

/// What the planner knows of one cut.
#[derive(Debug, Clone, Default)]
struct Cut {
    /// Batches cut here.
    tries: u64,
    /// Decision number of the last batch cut here.
    last: u64,
    /// Bytes sent per forwarded sample (after compression): it does not depend on the batch.
    bytes: Mean,
    /// The cloud's server time against samples forwarded.
    server: Line,
    /// Values per sample of the cut tensor here (seen whenever a batch runs past this cut).
    values: Option<f64>,
}

struct State {
    /// Exit counts after which a batch may be cut (ascending; the last is the head's deepest).
    cuts: Vec<usize>,
    /// Per candidate cut.
    per_cut: Vec<Cut>,
    /// Per group of the head (ending at `cuts[i]`): compute seconds against rows in.
    compute: Vec<Line>,
    /// Per exit (0-based model index): share of the samples reaching it that leave there.
    leave: Vec<Share>,
    /// Network seconds (round trip less the cloud's server time) against bytes sent per call.
    link: Line,
    /// Bytes sent per value of a forwarded cut tensor (the wire's dtype and compression): with
    /// a cut's values per sample, its bytes before it was ever forwarded.
    per_value: Mean,
    decisions: u64,
    current: Option<usize>,
}

/// Expected-time estimate of one cut for a batch, with its terms (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub cut: usize,
    pub compute: f64,
    pub link: f64,
    pub server: f64,
    pub total: f64,
}

/// Chooses the cut of every batch; shared by the runner thread (compute, local exits) and the
/// forwarding tasks (link, cloud, deeper exits).
pub struct SplitPlanner {
    state: Mutex<State>,
}

impl SplitPlanner {
    /// A planner over the candidate cuts `cuts` (exit counts, ascending) of a model with
    /// `exits` exits.
    pub fn new(cuts: Vec<usize>, exits: usize) -> SplitPlanner {
        let n = cuts.len();
        SplitPlanner {
            state: Mutex::new(State {
                cuts,
                per_cut: vec![Cut::default(); n],
                compute: vec![Line::default(); n],
                leave: vec![Share::default(); exits],
                link: Line::default(),
                per_value: Mean::default(),
                decisions: 0,
                current: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("no code panics while holding the split planner")
    }

    /// The candidate cuts (exit counts).
    pub fn cuts(&self) -> Vec<usize> {
        self.state().cuts.clone()
    }

    /// Re-targets the planner at new candidate cuts (the exit policy changed which exits can
    /// answer); estimates of cuts that remain are kept.
    pub fn set_cuts(&self, cuts: Vec<usize>) {
        let mut s = self.state();
        if s.cuts == cuts {
            return;
        }
        let keep = |old: &[usize], v: &[Cut], c: usize| old.iter().position(|&o| o == c).map(|i| v[i].clone());
        let per_cut = cuts.iter().map(|&c| keep(&s.cuts, &s.per_cut, c).unwrap_or_default()).collect();
        // Groups change with the cuts: their compute lines start again.
        s.compute = vec![Line::default(); cuts.len()];
        s.per_cut = per_cut;
        s.cuts = cuts;
        s.current = None;
    }

    /// The cut for a batch of `n` samples, and why.
    pub fn choose(&self, n: usize) -> (usize, Reason) {
        let mut s = self.state();
        s.decisions += 1;
        let now = s.decisions;
        let pick = |s: &State| -> (usize, Reason) {
            let tried = |i: usize| s.per_cut[i].tries >= EXPLORE_TRIES;
            // First the deepest cut: its batch runs every group, so one batch measures the
            // compute of all of them and the size of every cut tensor.
            // Until a forward has measured the link (batches are decided while earlier ones are
            // still in flight) every other cut would look free: stay there.
            let link_known = s.link.fit().is_some() || now > BLIND_BATCHES;
            if (0..s.cuts.len()).all(|i| !tried(i)) || !link_known {
                return (s.cuts.len() - 1, Reason::Explore);
            }
            let est = estimates(s, n);
            let best_tried =
                (0..s.cuts.len()).filter(|&i| tried(i)).map(|i| est[i].total).fold(f64::INFINITY, f64::min);
            // A cut is worth a try (or a probe, when its figures are stale) only if, with what is
            // known of it (its bytes from its tensor's size before it was ever forwarded, no
            // server time yet), it could be near the best: on a slow link one try of a shallow
            // cut costs several batches' worth of time.
            let promising = |i: usize| est[i].total <= best_tried * (1.0 + EXPLORE_MARGIN);
            if let Some(i) = (0..s.cuts.len())
                .filter(|&i| !tried(i) && promising(i))
                .min_by(|&a, &b| est[a].total.total_cmp(&est[b].total))
            {
                return (i, Reason::Explore);
            }
            if let Some(i) =
                (0..s.cuts.len()).find(|&i| tried(i) && now - s.per_cut[i].last > STALE_AFTER && promising(i))
            {
                return (i, Reason::Probe);
            }
            let best = est
                .iter()
                .enumerate()
                .filter(|&(i, _)| tried(i))
                .min_by(|a, b| a.1.total.total_cmp(&b.1.total))
                .map_or(s.cuts.len() - 1, |(i, _)| i);
            let current = s.current.and_then(|c| s.cuts.iter().position(|&x| x == c));
            match current {
                Some(c) if est[best].total >= est[c].total * (1.0 - HYSTERESIS) => (c, Reason::Best),
                _ => (best, Reason::Best),
            }
        };
        let (i, reason) = pick(&s);
        s.per_cut[i].tries += 1;
        s.per_cut[i].last = now;
        let cut = s.cuts[i];
        if reason == Reason::Best && s.current != Some(cut) {
            let est = estimates(&s, n);
            let text: Vec<String> = est.iter().map(|e| format!("E{} {:.1} ms", e.cut, e.total * 1e3)).collect();
            let (rtt, thr) = link_terms(&s);
            tracing::info!(
                cut = format!("E{cut}"),
                previous = s.current.map(|c| format!("E{c}")).unwrap_or_else(|| "none".into()),
                rtt_ms = rtt * 1e3,
                throughput_mbit_s = thr * 8.0 / 1e6,
                "split point moved: expected time per batch of {n}: {}",
                text.join(", ")
            );
            s.current = Some(cut);
        }
        (cut, reason)
    }

    /// The estimate of every candidate cut for a batch of `n`.
    pub fn estimates(&self, n: usize) -> Vec<Estimate> {
        estimates(&self.state(), n)
    }

    /// The group ending at exit count `end` took `seconds` for `rows` rows, of which `left`
    /// were answered at that exit (exit index `end - 1`); its cut tensor has `values` values
    /// per sample (0: none, the model's last exit).
    pub fn record_group(&self, end: usize, rows: usize, left: usize, seconds: f64, values: usize) {
        let mut s = self.state();
        if let Some(i) = s.cuts.iter().position(|&c| c == end) {
            s.compute[i].push(rows as f64, seconds);
            if values > 0 {
                s.per_cut[i].values = Some(values as f64);
            }
        }
        if let Some(share) = s.leave.get_mut(end - 1) {
            share.add(left as f64, rows as f64);
        }
    }

    /// A forward of `rows` samples at cut `cut` sent `sent_bytes` and was answered after
    /// `rtt` seconds, of which the cloud spent `server`; `exits` are the exit indices the cloud
    /// answered at (to learn how many samples leave at exits deeper than the cut that the head
    /// also holds).
    pub fn record_forward(&self, cut: usize, rows: usize, sent_bytes: u64, rtt: f64, server: f64, exits: &[usize]) {
        let mut s = self.state();
        if rows == 0 {
            return;
        }
        let network = (rtt - server).max(0.0);
        s.link.push(sent_bytes as f64, network);
        if let Some(i) = s.cuts.iter().position(|&c| c == cut) {
            if let Some(values) = s.per_cut[i].values {
                s.per_value.push(sent_bytes as f64 / (rows as f64 * values));
            }
            s.per_cut[i].bytes.push(sent_bytes as f64 / rows as f64);
            s.per_cut[i].server.push(rows as f64, server);
        }
        // Samples forwarded at `cut` reached every exit after it up to where they left.
        let held = s.cuts.last().copied().unwrap_or(0);
        for j in cut..held.min(s.leave.len()) {
            let reached = exits.iter().filter(|&&e| e >= j).count();
            let left = exits.iter().filter(|&&e| e == j).count();
            if reached > 0 {
                s.leave[j].add(left as f64, reached as f64);
            }
        }
    }
}

/// (round trip seconds, throughput bytes per second) of the link's current estimate.
fn link_terms(s: &State) -> (f64, f64) {
    match s.link.fit() {
        Some((a, b)) if b > 0.0 => (a, 1.0 / b),
        Some((a, _)) => (a, f64::INFINITY),
        None => (0.0, f64::INFINITY),
    }
}

fn estimates(s: &State, n: usize) -> Vec<Estimate> {
    let n = n as f64;
    let (rtt, thr) = link_terms(s);
    let mut out = Vec::with_capacity(s.cuts.len());
    // Share of the batch still running at the start of the current group.
    let mut reach = 1.0;
    let mut compute = 0.0;
    for (i, &cut) in s.cuts.iter().enumerate() {
        let rows = n * reach;
        compute += s.compute[i].predict(rows).unwrap_or(0.0);
        // Only a group's last exit can answer (the others are merged through).
        reach *= 1.0 - s.leave.get(cut - 1).map_or(0.0, |l| l.get());
        let survivors = n * reach;
        let p_any = 1.0 - (1.0 - reach).powf(n);
        let c = &s.per_cut[i];
        // Until a cut is forwarded at, its bytes follow from its tensor's size and the wire.
        let prior = c.values.zip(s.per_value.get()).map(|(v, b)| v * b);
        let bytes_per = c.bytes.get().or(prior).unwrap_or(0.0);
        let (server_fixed, server_per) = c.server.fit().unwrap_or((0.0, 0.0));
        let transfer = if thr.is_finite() { survivors * bytes_per / thr } else { 0.0 };
        let link = p_any * rtt + transfer;
        let server = p_any * server_fixed + survivors * server_per;
        // Batches flow through three stages that work at the same time on different batches:
        // the head, the link, the cloud. Under load the slowest stage sets the pace, and each
        // answer also waits for the round trip; so the slowest stage plus the round trip, not
        // the sum of all three (which would call every cut on a fast link equal and miss that
        // an even share of the work between head and cloud answers soonest).
        let total = compute.max(transfer).max(server) + p_any * rtt;
        out.push(Estimate { cut, compute, link, server, total });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated head of 3 candidate cuts over a link: compute per row per group, bytes per
    /// sample per cut, no early exits; returns the cut of each batch.
    fn simulate(p: &SplitPlanner, batches: usize, rtt: f64, bytes_per_s: f64) -> Vec<usize> {
        let compute_per_row = [0.001, 0.002, 0.004];
        let bytes = [40_000.0, 20_000.0, 10_000.0];
        let n = 16;
        (0..batches)
            .map(|_| {
                let (cut, _) = p.choose(n);
                let i = p.cuts().iter().position(|&c| c == cut).unwrap();
                for (g, per_row) in compute_per_row.iter().enumerate().take(i + 1) {
                    p.record_group(p.cuts()[g], n, 0, 0.0005 + per_row * n as f64, (bytes[g] / 4.0) as usize);
                }
                let sent = (bytes[i] * n as f64) as u64;
                let server = 0.002 + 0.0001 * n as f64;
                let rtt_seen = rtt + sent as f64 / bytes_per_s + server;
                p.record_forward(cut, n, sent, rtt_seen, server, &vec![6; n]);
                cut
            })
            .collect()
    }

    #[test]
    fn converges_to_the_cut_that_is_clearly_best_and_moves_when_the_link_changes() {
        let p = SplitPlanner::new(vec![1, 3, 5], 7);
        // A slow link (1 MB/s): bytes dominate; cut 5 (10 kB per sample) is best by far. The
        // first batch goes to the deepest cut and measures every group and tensor; the others
        // (2 and 4 times the bytes) are then known to be far slower and never tried.
        let cuts = simulate(&p, 60, 0.05, 1e6);
        assert!(cuts.iter().all(|&c| c == 5), "a slow link settles on the deepest cut at once: {cuts:?}");
        // A fast link (1 GB/s): the head's compute dominates; cut 1 is best. The link estimate
        // is shared, so the move needs no probe of the other cuts.
        let cuts = simulate(&p, 60, 0.0005, 1e9);
        let moved = cuts.iter().position(|&c| c == 1).expect("moves to E1");
        assert!(moved < 40, "moves within 40 batches of the change: {cuts:?}");
        assert!(cuts[moved..].iter().filter(|&&c| c == 1).count() >= cuts[moved..].len() - 1, "{cuts:?}");
    }

    #[test]
    fn a_near_tie_keeps_the_current_cut_and_a_clear_gain_moves_it() {
        // Two cuts whose costs differ by `gap` (a fraction): compute is the same, bytes differ.
        let run = |p: &SplitPlanner, gap: f64, batches: usize| -> Vec<usize> {
            (0..batches)
                .map(|_| {
                    let (cut, _) = p.choose(16);
                    p.record_group(1, 16, 0, 0.010, 0);
                    if cut == 2 {
                        p.record_group(2, 16, 0, 0.010, 0);
                    }
                    // Transfer time is what the link line learns: 1 MB/s, 100 kB at E1.
                    let bytes = if cut == 1 { 100_000.0 } else { 100_000.0 * (1.0 - gap) - 10_000.0 };
                    p.record_forward(cut, 16, bytes as u64, 0.001 + bytes / 1e6 + 0.002, 0.002, &[6; 16]);
                    cut
                })
                .collect()
        };
        let p = SplitPlanner::new(vec![1, 2], 7);
        let cuts = run(&p, 0.0, 40);
        let settled = *cuts.last().unwrap();
        assert!(cuts[10..].iter().all(|&c| c == settled), "a tie does not flip-flop: {cuts:?}");
        // The other cut becomes 2 % cheaper than the current: not enough to move.
        let other = 3 - settled;
        let gap = |target: usize, frac: f64| if target == 2 { frac } else { -frac };
        let cuts = run(&p, gap(other, 0.02), 40);
        assert!(cuts.iter().filter(|&&c| c == settled).count() >= 38, "a 2 % gain is within the noise: {cuts:?}");
        // 30 % cheaper: it moves.
        let cuts = run(&p, gap(other, 0.3), 60);
        assert!(cuts[30..].iter().all(|&c| c == other), "a clear gain moves the cut: {cuts:?}");
    }

    #[test]
    fn a_cut_is_tried_only_when_what_is_known_of_it_could_make_it_near_the_best() {
        // Equal compute per group; the cut tensors hold 12,544, 6,272 and 1,568 values per
        // sample (4 bytes each on the wire). Over a link of 5 MB/s the transfer decides: cut 5
        // is best, cuts 3 and 1 send 4 and 8 times its bytes and are never tried.
        let p = SplitPlanner::new(vec![1, 3, 5], 7);
        let values = [12_544usize, 6_272, 1_568];
        let mut chosen = Vec::new();
        for _ in 0..40 {
            let (cut, _) = p.choose(16);
            let i = p.cuts().iter().position(|&c| c == cut).unwrap();
            for (g, &v) in values.iter().enumerate().take(i + 1) {
                p.record_group(p.cuts()[g], 16, 0, 0.004, v);
            }
            let sent = 16 * values[i] as u64 * 4;
            p.record_forward(cut, 16, sent, 0.01 + sent as f64 / 5e6 + 0.005, 0.005, &[6; 16]);
            chosen.push(cut);
        }
        assert_eq!(chosen[0], 5, "the deepest cut first: {chosen:?}");
        assert!(chosen.iter().all(|&c| c == 5), "cuts 1 and 3 are known to be slower: {chosen:?}");
        let e = p.estimates(16);
        assert!(e[0].link > 4.0 * e[2].link && e[1].link > 2.0 * e[2].link, "bytes known without a try: {e:?}");
    }

    #[test]
    fn batches_decided_before_any_forward_returns_stay_at_the_deepest_cut() {
        let p = SplitPlanner::new(vec![1, 3, 5], 7);
        // 16 batches in flight: the runner has measured them, no forward has come back.
        for _ in 0..16 {
            let (cut, reason) = p.choose(16);
            assert_eq!((cut, reason), (5, Reason::Explore));
            for (g, v) in [(1, 12_544), (3, 6_272), (5, 1_568)] {
                p.record_group(g, 16, 0, 0.004, v);
            }
        }
        // Once the link is measured (slow: 1 MB/s), the shallow cuts are known to be worse.
        p.record_forward(5, 16, 16 * 1_568 * 4, 0.01 + 16.0 * 1_568.0 * 4.0 / 1e6 + 0.005, 0.005, &[6; 16]);
        assert_eq!(p.choose(16).0, 5);
    }

    #[test]
    fn a_stale_cut_is_probed_and_probes_are_a_small_share() {
        let p = SplitPlanner::new(vec![1, 3, 5], 7);
        let mut reasons = Vec::new();
        for _ in 0..1000 {
            let (cut, reason) = p.choose(16);
            reasons.push(reason);
            p.record_group(1, 16, 0, 0.01, 0);
            p.record_forward(cut, 16, 16 * 40_000 / cut as u64, 0.1, 0.01, &[6; 16]);
        }
        let probes = reasons.iter().filter(|r| **r == Reason::Probe).count();
        assert!(probes >= 2, "cuts not chosen are probed again: {probes}");
        assert!(probes <= 1000 / STALE_AFTER as usize * 2 + 2, "probes stay rare: {probes}");
    }

    #[test]
    fn early_exits_make_deeper_cuts_cheaper_on_a_slow_link() {
        // With every sample leaving at E3, cutting at E3 forwards nothing at all.
        // No forward ever measures the link at E3, so E1 is tried once the planner stops
        // waiting for one (BLIND_BATCHES).
        let p = SplitPlanner::new(vec![1, 3], 7);
        for _ in 0..BLIND_BATCHES + 8 {
            let (cut, _) = p.choose(16);
            p.record_group(1, 16, 0, 0.001, 0);
            if cut == 3 {
                p.record_group(3, 16, 16, 0.002, 0);
            } else {
                p.record_forward(1, 16, 16 * 40_000, 0.05 + 0.64, 0.002, &[2; 16]);
            }
        }
        let e = p.estimates(16);
        assert!(e[1].total < e[0].total, "{e:?}");
        assert_eq!(e[1].link, 0.0, "nothing crosses the link at E3: {e:?}");
    }

    #[test]
    fn a_line_separates_fixed_and_per_unit_costs() {
        let mut l = Line::default();
        for x in [1.0, 2.0, 4.0, 8.0] {
            l.push(x, 0.05 + 0.01 * x);
        }
        let (a, b) = l.fit().unwrap();
        assert!((a - 0.05).abs() < 1e-9 && (b - 0.01).abs() < 1e-9, "{a} {b}");
        let mut flat = Line::default();
        flat.push(10.0, 1.0);
        flat.push(10.0, 1.0);
        assert_eq!(flat.predict(10.0), Some(1.0), "no spread in x: still predicts what it saw");
    }
}
