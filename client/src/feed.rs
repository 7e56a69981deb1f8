//! Timeline mode: the stream of posts, the lines typed as posts, and
//! failover. The input is read all along, while a stream opens and while
//! the client looks for another server too, so every post typed is either
//! delivered or reported as not delivered, and nothing typed is left unread
//! for whatever runs after the client.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Local, Utc};
use sns_proto::csce438::Message;
use sns_proto::rules;
use tokio::io::AsyncBufRead;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::connect::attach;
use crate::console::Console;
use crate::error::Error;
use crate::input::{Event, Input};
use crate::output;
use crate::session::{Exit, Session, session_seed};
use crate::timeline::{self, MAX_POST_BYTES, PendingPosts, PostKey, SeenPosts, Typed};
use sns_proto::backoff::Backoff;

/// A timeline stream that stayed open this long was working, so a failure
/// after it starts the backoff afresh; one that breaks sooner (a server
/// closing every stream it opens) gets ever longer pauses instead of a tight
/// reconnect loop.
const STABLE_STREAM: Duration = Duration::from_secs(2);

/// The user ended timeline mode.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// End of input (Ctrl-D): wait for acknowledgements, then leave.
    EndOfInput,
    /// Ctrl-C: leave now.
    Interrupted,
}

/// Why a timeline stream ended.
enum StreamEnd {
    Stop(Stop),
    Broken(Error),
}

/// How a wait that read the input meanwhile ended.
enum Waited<T> {
    Done(T),
    Stop(Stop),
}

/// Why looking for another server ended without one.
enum Gone {
    Stop(Stop),
    GaveUp(Error),
}

impl Session {
    /// Timeline mode, for the rest of the session.
    pub(crate) async fn timeline<R, W>(&mut self, input: &mut Input<R>, console: &mut Console<W>) -> Exit
    where
        R: AsyncBufRead + Unpin,
        W: Write,
    {
        input.set_prompt("");
        let mut feed = Feed {
            user: self.username(),
            input,
            console,
            seen: SeenPosts::default(),
            position: 0,
            anchor: 0,
            pending: PendingPosts::new(session_seed()),
            ended: false,
            entered: false,
        };
        feed.run(self).await
    }
}

/// Timeline mode's state.
struct Feed<'a, R, W> {
    user: String,
    input: &'a mut Input<R>,
    console: &'a mut Console<W>,
    seen: SeenPosts,
    /// The feed position of the last live post received (`feedPosition`),
    /// or, before one came, where the stream said its live posts start (0:
    /// neither yet, or a server that says neither). A stream opened again
    /// (after a failover) asks for the posts after it, so none made
    /// meanwhile is missed, however many.
    position: u64,
    /// The `feedAnchor` of `position` (with the post there, or with the
    /// stream's start): the server resumes there only if its feed still
    /// has that history.
    anchor: u64,
    /// Posts typed and not yet acknowledged: sent again after a failover.
    pending: PendingPosts<Message>,
    /// The input has ended: nothing more will be typed.
    ended: bool,
    /// A stream opened once, and the user was told they are in the
    /// timeline.
    entered: bool,
}

impl<R, W> Feed<'_, R, W>
where
    R: AsyncBufRead + Unpin,
    W: Write,
{
    async fn run(&mut self, session: &mut Session) -> Exit {
        let timing = session.config.timing.clone();
        let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
        // Since when the server has been refusing the stream on purpose.
        let mut refused_since: Option<Instant> = None;
        loop {
            let opened = Instant::now();
            let err = match self.stream(session).await {
                StreamEnd::Stop(stop) => return self.stop(stop),
                StreamEnd::Broken(err) => err,
            };
            if opened.elapsed() >= STABLE_STREAM {
                backoff.reset();
                refused_since = None;
            }
            if err.is_connection_lost() {
                refused_since = None;
                self.console.note(&output::server_lost(&session.server_at, &err));
                if opened.elapsed() < STABLE_STREAM
                    && let Waited::Stop(stop) = self.while_reading(sleep(backoff.next_delay()), true).await
                {
                    return self.stop(stop);
                }
                match self.reconnect(session).await {
                    Ok(()) => {}
                    Err(Gone::Stop(stop)) => return self.stop(stop),
                    Err(Gone::GaveUp(err)) => {
                        return self.give_up(&format!("giving up reconnecting after {:?}: {err}", timing.failover));
                    }
                }
            } else {
                // The server is there but refuses the stream (say, because
                // it still holds our previous one). Retry on the same server
                // for as long as a failover may take.
                self.console.note(&format!("timeline refused: {err}"));
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= timing.failover {
                    return self.give_up(&format!("the server kept refusing the timeline: {err}"));
                }
                if let Waited::Stop(stop) = self.while_reading(sleep(backoff.next_delay()), true).await {
                    return self.stop(stop);
                }
            }
        }
    }

    /// Leaves at the user's request, saying which posts may be lost.
    fn stop(&mut self, stop: Stop) -> Exit {
        self.input.release();
        self.report_undelivered();
        match stop {
            Stop::EndOfInput => Exit::EndOfInput,
            Stop::Interrupted => Exit::Interrupted,
        }
    }

    /// Leaves because no server can be had, saying `why` on stderr.
    fn give_up(&mut self, why: &str) -> Exit {
        self.input.release();
        self.console.note(why);
        self.report_undelivered();
        self.console.line(output::CONNECTION_FAILED);
        Exit::ConnectionFailed
    }

    fn report_undelivered(&mut self) {
        for post in self.pending.undelivered() {
            self.console.line(&output::post_not_delivered(&post.msg));
        }
    }

    /// Takes a typed line; a post is queued (unsent) and returned to be
    /// sent now if a stream is open.
    fn typed(&mut self, line: &str) -> Option<Message> {
        match timeline::classify(line) {
            Typed::Blank => None,
            Typed::TooLong(bytes) => {
                self.console.line(&output::post_too_long(bytes, MAX_POST_BYTES));
                None
            }
            Typed::Post(text) => {
                let user = &self.user;
                self.pending.add(|id| Message { post_id: id, ..message(user, text) });
                self.pending.newest().cloned()
            }
        }
    }

    /// Awaits `work` while taking what is typed meanwhile (posts are queued
    /// for the next stream). With `stop_at_end`, the end of input stops the
    /// wait once nothing typed is left to deliver.
    async fn while_reading<T>(&mut self, work: impl Future<Output = T>, stop_at_end: bool) -> Waited<T> {
        tokio::pin!(work);
        loop {
            if stop_at_end && self.ended && self.pending.undelivered().next().is_none() {
                return Waited::Stop(Stop::EndOfInput);
            }
            tokio::select! {
                biased;
                value = &mut work => return Waited::Done(value),
                event = self.input.next() => match event {
                    Event::Line(line) => {
                        self.typed(&line);
                    }
                    Event::End => self.ended = true,
                    Event::Interrupted => return Waited::Stop(Stop::Interrupted),
                },
            }
        }
    }

    /// Polls the coordinator until it names a server that accepts our
    /// login, then switches to it; reads the input all the while.
    async fn reconnect(&mut self, session: &mut Session) -> Result<(), Gone> {
        let timing = session.config.timing.clone();
        let deadline = Instant::now() + timing.failover;
        let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
        loop {
            let login = session.new_request_id();
            let attempt = timeout_at(deadline, attach(&session.config, &session.coordinator, login));
            let last_error = match self.while_reading(attempt, true).await {
                Waited::Stop(stop) => return Err(Gone::Stop(stop)),
                Waited::Done(Ok(Ok(attached))) => {
                    session.server = attached.server;
                    self.console.line(&output::reconnected(&attached.shown_as));
                    session.server_at = attached.shown_as;
                    return Ok(());
                }
                Waited::Done(Ok(Err(err))) => err,
                Waited::Done(Err(_)) => return Err(Gone::GaveUp(Error::Timeout(timing.failover))),
            };
            let pause = backoff.next_delay();
            if Instant::now() + pause >= deadline {
                return Err(Gone::GaveUp(last_error));
            }
            if let Waited::Stop(stop) = self.while_reading(sleep(pause), true).await {
                return Err(Gone::Stop(stop));
            }
        }
    }

    /// One timeline stream: open it, send what is waiting, then show what
    /// arrives and post what is typed until input ends or the stream breaks.
    async fn stream(&mut self, session: &Session) -> StreamEnd {
        // Unbounded: sending never blocks the loop below (which must keep
        // showing posts), and what is queued is what one person types.
        let (outbox, outgoing) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is alive right here.
        let _ = outbox.send(Message {
            feed_position: self.position,
            feed_anchor: self.anchor,
            ..message(&self.user, String::new())
        });
        let rpc = session.config.timing.rpc;
        let mut server = session.server.clone();
        let opening = timeout(rpc, server.timeline(UnboundedReceiverStream::new(outgoing)));
        let (mut incoming, start) = match self.while_reading(opening, false).await {
            Waited::Stop(stop) => return StreamEnd::Stop(stop),
            Waited::Done(Ok(Ok(response))) => {
                let start = rules::feed_start(response.metadata());
                (response.into_inner(), start)
            }
            Waited::Done(Ok(Err(status))) => return StreamEnd::Broken(status.into()),
            Waited::Done(Err(_)) => return StreamEnd::Broken(Error::Timeout(rpc)),
        };
        // Live posts continue the feed after `start`: resume from there even
        // if none comes before the next break. Backlog posts (at or before
        // it) move nothing.
        if let Some((position, anchor)) = start {
            (self.position, self.anchor) = (position, anchor);
        }
        let live_after = start.map_or(0, |(position, _)| position);
        // Only now, with the stream open, has TIMELINE succeeded.
        if !self.entered {
            self.entered = true;
            self.console.line(output::SUCCESS);
            self.console.line(output::TIMELINE_ENTERED);
        }
        for post in self.pending.to_send() {
            if outbox.send(post).is_err() {
                return StreamEnd::Broken(Error::StreamEnded);
            }
        }
        // Set at end of input: until when to wait for the last
        // acknowledgements (pushed back while they keep coming).
        let mut closing: Option<Instant> = self.ended.then(|| Instant::now() + rpc);
        loop {
            if let Some(deadline) = closing
                && (!self.pending.awaiting_ack() || Instant::now() >= deadline)
            {
                return StreamEnd::Stop(Stop::EndOfInput);
            }
            let wait_until = closing.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                // Server first: when both are ready and the stream has just
                // broken, the typed line stays unread until a new stream is
                // open rather than going into the dead one.
                biased;
                received = incoming.message() => match received {
                    Ok(Some(post)) if post.post_id != 0 && post.msg.is_empty() => {
                        for post in self.pending.ack(post.post_id) {
                            if outbox.send(post).is_err() {
                                return StreamEnd::Broken(Error::StreamEnded);
                            }
                        }
                        if closing.is_some() {
                            closing = Some(Instant::now() + rpc);
                        }
                    }
                    Ok(Some(post)) => {
                        // The last live post received, not the highest
                        // position: a stream that started over (the feed's
                        // history changed) counts in its new feed.
                        if post.feed_position > live_after {
                            self.position = post.feed_position;
                            self.anchor = post.feed_anchor;
                        }
                        show(post, &mut self.seen, self.console);
                    }
                    Ok(None) => return StreamEnd::Broken(Error::StreamEnded),
                    Err(status) => return StreamEnd::Broken(status.into()),
                },
                _ = sleep_until(wait_until), if closing.is_some() => {}
                // After the end of input this waits for Ctrl-C only.
                event = self.input.next() => match event {
                    Event::Line(line) => {
                        if let Some(post) = self.typed(&line) {
                            if outbox.send(post).is_err() {
                                return StreamEnd::Broken(Error::StreamEnded);
                            }
                            self.pending.mark_last_sent();
                        }
                    }
                    // Posts still in flight get a moment to be acknowledged.
                    Event::End => {
                        self.ended = true;
                        closing = Some(Instant::now() + rpc);
                    }
                    Event::Interrupted => return StreamEnd::Stop(Stop::Interrupted),
                },
            }
        }
    }
}

/// A timeline message from `user`, stamped now.
fn message(user: &str, text: String) -> Message {
    Message {
        username: user.to_owned(),
        msg: text,
        timestamp: Some(SystemTime::now().into()),
        post_id: 0,
        feed_position: 0,
        feed_anchor: 0,
    }
}

/// Prints a received post unless this session has shown it already.
fn show<W: Write>(post: Message, seen: &mut SeenPosts, console: &mut Console<W>) {
    let key = PostKey { user: post.username, seconds: post.timestamp.map(|t| t.seconds), text: post.msg };
    // A post without a time (which our servers never send) is shown at the
    // time it arrives rather than at the epoch.
    let posted = post
        .timestamp
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now)
        .with_timezone(&Local);
    let line = output::post_line(&key.user, &key.text, &posted);
    if seen.first_sighting(key) {
        console.line(&line);
    }
}
