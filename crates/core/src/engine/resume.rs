//! Which audience pages a broadcast has finished, so an interrupted
//! broadcast can resume after its last fully finished page instead of from
//! the start.
//!
//! Sends finish out of order (they run concurrently), so a page counts as
//! finished when every connection on it has an outcome, and a segment's
//! resume point only moves past pages that are finished *and* follow an
//! unbroken run of finished pages. The engine starts no page of a segment
//! while the page two before it still has sends without an answer (see
//! [`ResumePoints::may_start`]), so resuming there repeats at most the pages
//! that were partly done: two pages per segment plus what was in flight.
//! A deferred answer counts as an answer there though not as finished: the
//! pass over the audience goes on past it, and the deferred passes retry it
//! after that pass.

use std::collections::{BTreeMap, VecDeque};

use crate::store::Cursor;

/// Identifies the page a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTag {
    segment: u32,
    seq: u64,
}

impl PageTag {
    /// The segment of the read the page came from.
    pub fn segment(self) -> u32 {
        self.segment
    }
}

/// One segment's pages in flight.
#[derive(Debug, Default)]
struct Segment {
    /// Sequence number the next page gets.
    next_seq: u64,
    /// Sequence number of the front of `open`.
    first_seq: u64,
    /// Pages not yet passed by the resume point, in order.
    open: VecDeque<OpenPage>,
    /// Sequence number of the first page with a send still unanswered (or
    /// of the next page): every page before it has all its answers.
    answered_front: u64,
    /// Where to resume: after the last page of the unbroken finished run.
    resume: Option<Cursor>,
}

/// A page the resume point has not passed yet.
#[derive(Debug)]
struct OpenPage {
    /// Connections without a final outcome.
    unfinished: usize,
    /// Connections without any answer yet (deferred counts as an answer).
    unanswered: usize,
    /// The cursor after the page.
    next: Cursor,
}

/// Tracks every segment of one broadcast.
#[derive(Debug, Default)]
pub struct ResumePoints {
    segments: BTreeMap<u32, Segment>,
    /// Bumped whenever a resume point moves: a checkpoint is worth writing.
    moves: u64,
}

impl ResumePoints {
    /// Seeds the resume points a resumed job started from, so a segment
    /// that makes no progress this time still resumes where it did before.
    pub fn starting_from(cursors: &[Cursor]) -> Self {
        let mut progress = Self::default();
        for cursor in cursors {
            progress.segments.entry(cursor.segment).or_default().resume = Some(cursor.clone());
        }
        progress
    }

    /// Registers a page of `count` connections (after exclusions), which
    /// ends at `next`.
    pub fn start_page(&mut self, count: usize, next: Cursor) -> PageTag {
        let segment_no = next.segment;
        let segment = self.segments.entry(segment_no).or_default();
        let tag = PageTag {
            segment: segment_no,
            seq: segment.next_seq,
        };
        segment.next_seq += 1;
        segment.open.push_back(OpenPage {
            unfinished: count,
            unanswered: count,
            next,
        });
        self.moves += u64::from(segment.advance());
        tag
    }

    /// Records that one connection of the tagged page has its final
    /// outcome.
    #[cfg(test)]
    fn finish(&mut self, tag: PageTag) {
        self.answer(tag, true);
    }

    /// Records an answer for one connection of the tagged page: final, or
    /// deferred to a later pass (`finished: false`).
    pub fn answer(&mut self, tag: PageTag, finished: bool) {
        let Some(segment) = self.segments.get_mut(&tag.segment) else {
            return;
        };
        let Some(index) = tag.seq.checked_sub(segment.first_seq) else {
            return;
        };
        if let Some(page) = segment.open.get_mut(index as usize) {
            page.unanswered = page.unanswered.saturating_sub(1);
            if finished {
                page.unfinished = page.unfinished.saturating_sub(1);
            }
        }
        self.moves += u64::from(segment.advance());
    }

    /// How often a resume point has moved so far.
    pub fn moves(&self) -> u64 {
        self.moves
    }

    /// Whether the sends of the tagged page may start: every page of its
    /// segment at least two before it has all its answers. Without this, one
    /// straggler would hold the resume point while the other sends ran on
    /// through any number of later pages, all of which a resumed job would
    /// repeat.
    pub fn may_start(&self, tag: PageTag) -> bool {
        self.segments
            .get(&tag.segment)
            .is_none_or(|segment| segment.answered_front + 1 >= tag.seq)
    }

    /// Segments whose every page is finished (their resume point is the
    /// segment's end), for the share of a scan that is done.
    pub fn segments_done(&self) -> u32 {
        self.segments
            .values()
            .filter(|segment| {
                segment
                    .resume
                    .as_ref()
                    .is_some_and(|cursor| cursor.position.is_none())
            })
            .count() as u32
    }

    /// Where each segment could resume if the connections deferred so far
    /// were carried along: after the last page with every answer in (a
    /// deferred answer counts), or where [`resume_points`](Self::resume_points)
    /// says. A checkpoint that lists those connections may use these.
    pub fn answered_points(&self) -> Vec<Cursor> {
        self.segments
            .values()
            .filter_map(|segment| {
                let answered = segment.answered_front.checked_sub(segment.first_seq)?;
                match answered.checked_sub(1) {
                    Some(last) => segment.open.get(last as usize).map(|p| p.next.clone()),
                    None => None,
                }
                .or_else(|| segment.resume.clone())
            })
            .collect()
    }

    /// Where each segment's reading got to: after the last page taken up,
    /// answered or not. What lies past these was never read.
    pub fn read_points(&self) -> Vec<Cursor> {
        self.segments
            .values()
            .filter_map(|segment| {
                segment
                    .open
                    .back()
                    .map(|page| page.next.clone())
                    .or_else(|| segment.resume.clone())
            })
            .collect()
    }

    /// Where each segment that made progress should resume. A segment not
    /// listed has not finished a page: it starts from its beginning.
    pub fn resume_points(&self) -> Vec<Cursor> {
        self.segments
            .values()
            .filter_map(|segment| segment.resume.clone())
            .collect()
    }
}

impl Segment {
    /// Moves the resume point past finished pages; whether it moved.
    fn advance(&mut self) -> bool {
        let mut moved = false;
        while self.open.front().is_some_and(|page| page.unfinished == 0) {
            let page = self.open.pop_front().expect("front exists");
            self.resume = Some(page.next);
            self.first_seq += 1;
            moved = true;
        }
        self.answered_front = self.answered_front.max(self.first_seq);
        while self
            .open
            .get((self.answered_front - self.first_seq) as usize)
            .is_some_and(|page| page.unanswered == 0)
        {
            self.answered_front += 1;
            moved = true;
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Position;

    fn at(segment: u32, offset: usize) -> Cursor {
        Cursor {
            segment,
            position: Some(Position::Offset(offset)),
        }
    }

    #[test]
    fn the_resume_point_moves_only_past_an_unbroken_run_of_finished_pages() {
        let mut progress = ResumePoints::default();
        let p1 = progress.start_page(2, at(0, 2));
        let p2 = progress.start_page(1, at(0, 3));
        assert!(progress.resume_points().is_empty());
        // The second page finishes first: no resume point yet.
        progress.finish(p2);
        assert!(progress.resume_points().is_empty());
        progress.finish(p1);
        assert!(progress.resume_points().is_empty());
        assert_eq!(progress.moves(), 0);
        progress.finish(p1);
        // Both pages are done now.
        assert_eq!(progress.resume_points(), [at(0, 3)]);
        assert_eq!(progress.moves(), 1, "one move, past both");
    }

    #[test]
    fn a_page_whose_only_open_connection_is_deferred_is_answered_not_finished() {
        let mut progress = ResumePoints::default();
        let p1 = progress.start_page(2, at(0, 2));
        let p2 = progress.start_page(1, at(0, 3));
        progress.start_page(1, at(0, 4));
        progress.finish(p1);
        progress.answer(p1, false);
        progress.finish(p2);
        assert!(
            progress.resume_points().is_empty(),
            "the first page has a deferred one"
        );
        assert_eq!(
            progress.answered_points(),
            [at(0, 3)],
            "both pages answered"
        );
        assert!(progress.moves() > 0, "worth a checkpoint");
    }

    #[test]
    fn a_segment_is_done_once_its_last_page_is_finished() {
        let end = |segment| Cursor {
            segment,
            position: None,
        };
        let mut progress = ResumePoints::starting_from(&[end(2)]);
        assert_eq!(progress.segments_done(), 1, "a resumed job's done segment");
        let first = progress.start_page(1, at(0, 1));
        let last = progress.start_page(1, end(0));
        progress.start_page(1, at(1, 1));
        progress.finish(last);
        assert_eq!(progress.segments_done(), 1, "an earlier page is open");
        progress.finish(first);
        assert_eq!(progress.segments_done(), 2);
    }

    #[test]
    fn empty_pages_finish_at_once_and_segments_are_independent() {
        let mut progress = ResumePoints::default();
        progress.start_page(0, at(0, 5));
        let b = progress.start_page(1, at(1, 7));
        assert_eq!(progress.resume_points(), [at(0, 5)]);
        progress.finish(b);
        assert_eq!(progress.resume_points(), [at(0, 5), at(1, 7)]);
        // The end of a segment: a cursor without a position.
        progress.start_page(
            0,
            Cursor {
                segment: 1,
                position: None,
            },
        );
        assert_eq!(
            progress.resume_points()[1],
            Cursor {
                segment: 1,
                position: None
            }
        );
    }

    #[test]
    fn a_page_waits_for_the_answers_of_the_page_two_before_it_deferred_or_not() {
        let mut progress = ResumePoints::default();
        let p1 = progress.start_page(2, at(0, 2));
        let p2 = progress.start_page(1, at(0, 3));
        let p3 = progress.start_page(1, at(0, 4));
        assert!(progress.may_start(p1) && progress.may_start(p2));
        assert!(!progress.may_start(p3), "page 1 has sends unanswered");
        progress.finish(p2);
        progress.finish(p1);
        assert!(!progress.may_start(p3));
        // The last send of page 1 is deferred: page 1 is answered, not
        // finished.
        progress.answer(p1, false);
        assert!(progress.may_start(p3));
        assert!(progress.resume_points().is_empty());
        let p4 = progress.start_page(1, at(0, 5));
        assert!(progress.may_start(p4), "page 2 is finished");
        let p5 = progress.start_page(1, at(0, 6));
        assert!(!progress.may_start(p5), "page 3 is unanswered");
    }

    #[test]
    fn a_resumed_job_keeps_its_old_resume_point_until_it_progresses() {
        let mut progress = ResumePoints::starting_from(&[at(2, 100)]);
        assert_eq!(progress.resume_points(), [at(2, 100)]);
        let tag = progress.start_page(1, at(2, 200));
        assert_eq!(progress.resume_points(), [at(2, 100)]);
        progress.finish(tag);
        assert_eq!(progress.resume_points(), [at(2, 200)]);
    }
}
