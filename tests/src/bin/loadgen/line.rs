//! The waiting-line shape (`--line-students N`): more students arrive than the pool holds, each
//! with `Prefer: wait`, while new sandboxes are registered during the run, so a line forms on
//! every track and is served from the supply (ADR 0029). It measures what the allocation levels
//! cannot: how many were served from the line, how long they waited, whether a line kept its
//! order, how many waits ran out, and how long the line grew.
//!
//! Students arrive one every `--line-arrival-ms`, round robin over the tracks; student `i` is
//! caller `line-<run>-<i>`; its arrival is the instant its request was sent (one connection per
//! student is opened beforehand, so no request waits for a connection the others do not). The
//! order served is the order of the allocation events' ids (see [`Served`]). The supply is registered in batches
//! through the service's own broker (what `sync` records for new accounts), starting one
//! interval after the first arrival. The run ends by itself when the last student is answered:
//! at most the last arrival plus the wait plus the HTTP timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::model::events::{BrokerEvent, SandboxEvent};
use hdrhistogram::Histogram;
use tests::app::{TestApp, TRACK_TOKEN};
use tests::history::all_events;
use uuid::Uuid;

/// The shape of one run.
pub(crate) struct LineShape {
    /// Students that arrive.
    pub(crate) students: usize,
    /// Gap between two arrivals.
    pub(crate) arrival_gap: Duration,
    /// `Prefer: wait=` of every request, seconds.
    pub(crate) wait_s: u64,
    /// Sandboxes registered during the run.
    pub(crate) supply: usize,
    /// Sandboxes per registration batch.
    pub(crate) supply_batch: usize,
    /// Gap between two batches (the first comes one gap after the first arrival).
    pub(crate) supply_gap: Duration,
}

/// One student's answer.
struct Answer {
    index: usize,
    track: usize,
    status: u16,
    /// The 409 named a place in line: the wait ran out (a full line answers without one).
    had_position: bool,
    latency: Duration,
    /// When its request was sent, since the run started.
    sent: Duration,
}

/// A student served after one of its track who arrived later.
#[derive(Debug, PartialEq)]
struct Overtaken {
    /// The student (its index).
    index: usize,
    /// The latest arrival served before it.
    by: usize,
    /// How much later than this student that one was sent.
    sent_later: Duration,
}

/// One student served from the line.
#[derive(Clone, Copy)]
struct Served {
    track: usize,
    index: usize,
    /// When its request was sent, since the run started: its arrival.
    sent: Duration,
    /// The event id of its allocation: ids are UUID v7, which one process generates in
    /// increasing order, and a line decides one allocation after the other, so their order is
    /// the order served.
    event_id: Uuid,
}

/// Students served after another student of their track who was sent later, per track: each is
/// listed once, however many overtook it.
fn overtaken(served: &[Served]) -> BTreeMap<usize, Vec<Overtaken>> {
    let mut by_track: BTreeMap<usize, Vec<Served>> = BTreeMap::new();
    for student in served {
        by_track.entry(student.track).or_default().push(*student);
    }
    by_track
        .into_iter()
        .map(|(track, mut students)| {
            students.sort_by_key(|s| s.event_id);
            // Walking in the order served, a student is overtaken when someone served before it
            // arrived after it.
            let mut latest: Option<Served> = None;
            let mut overtaken = Vec::new();
            for student in students {
                match latest {
                    Some(by) if by.sent > student.sent => overtaken.push(Overtaken {
                        index: student.index,
                        by: by.index,
                        sent_later: by.sent - student.sent,
                    }),
                    _ => latest = Some(student),
                }
            }
            (track, overtaken)
        })
        .collect()
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000, 3).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the shape against `app` (pool already seeded) and returns its figures as JSON.
pub(crate) async fn run(
    app: &TestApp,
    client: &reqwest::Client,
    shape: &LineShape,
    prefix: &str,
    tracks: Arc<Vec<String>>,
    run_id: &str,
) -> anyhow::Result<serde_json::Value> {
    // One open connection per student before the first arrives, so that a student's place is
    // not decided by which request waited for a new connection.
    let warm = (0..shape.students).map(|_| client.get(format!("{}/healthz", app.url)).send());
    futures::future::join_all(warm).await;

    let started = Instant::now();
    let start = tokio::time::Instant::from_std(started);

    // The line's length as the service reports it, sampled until the students are answered.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let state = app.state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut peak, mut peak_by_track) = (0.0f64, BTreeMap::<String, f64>::new());
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let mut text = String::new();
                let _ =
                    prometheus::TextEncoder::new().encode_utf8(&state.registry.gather(), &mut text);
                let lines = super::sum_by_label(&text, "broker_waiting_line_length", "track");
                peak = peak.max(lines.values().sum());
                for (track, n) in lines {
                    let seen = peak_by_track.entry(track).or_default();
                    *seen = seen.max(n);
                }
            }
            (peak, peak_by_track)
        })
    };

    let supply = {
        let batches = shape.supply.div_ceil(shape.supply_batch.max(1));
        let (gap, batch, total) = (shape.supply_gap, shape.supply_batch.max(1), shape.supply);
        let prefix = prefix.to_string();
        async move {
            let mut registered = Vec::new();
            for k in 0..batches {
                tokio::time::sleep_until(start + gap * (k as u32 + 1)).await;
                let n = batch.min(total - k * batch);
                // Names `<prefix>-s<k>-0000` …: the students' prefix matches them, ids are new.
                app.register(&format!("{prefix}-s{k}"), n).await;
                registered.push((started.elapsed(), n));
            }
            registered
        }
    };

    let students = (0..shape.students).map(|index| {
        let client = client.clone();
        let tracks = tracks.clone();
        let (url, prefix) = (app.url.clone(), prefix.to_string());
        let caller = format!("line-{run_id}-{index}");
        let at = start + shape.arrival_gap * index as u32;
        let wait_s = shape.wait_s;
        async move {
            tokio::time::sleep_until(at).await;
            let track = index % tracks.len().max(1);
            let sent_at = started.elapsed();
            let sent = Instant::now();
            let reply = client
                .post(format!("{url}/v1/allocate"))
                .bearer_auth(TRACK_TOKEN)
                .header("Prefer", format!("wait={wait_s}"))
                .header("X-Instruqt-Sandbox-ID", &caller)
                .header("X-Instruqt-Track-ID", tracks[track].as_str())
                .header("X-Sandbox-Name-Prefix", &prefix)
                .send()
                .await;
            let (status, had_position) = match &reply {
                Ok(r) => (
                    r.status().as_u16(),
                    r.headers().contains_key("queue-position"),
                ),
                Err(_) => (0, false),
            };
            (
                caller,
                Answer {
                    index,
                    track,
                    status,
                    had_position,
                    latency: sent.elapsed(),
                    sent: sent_at,
                },
            )
        }
    });
    let (registered, answers) = tokio::join!(supply, futures::future::join_all(students));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (peak, peak_by_track) = sampler.await.unwrap_or_default();
    let elapsed = started.elapsed();

    // Which 201s waited, and how long, as the service recorded it on the allocation.
    let mut waited: BTreeMap<String, (u64, Uuid)> = BTreeMap::new();
    for event in all_events(app.state.broker.events().as_ref()).await {
        if let Ok(BrokerEvent::Sandbox(SandboxEvent::SandboxAllocated {
            caller,
            waited_ms: Some(ms),
            ..
        })) = event.decode()
        {
            waited.insert(caller, (ms, event.event_id));
        }
    }

    let mut statuses = BTreeMap::<u16, usize>::new();
    let (mut served_wait, mut served_latency, mut immediate_latency) =
        (histogram(), histogram(), histogram());
    let mut served = Vec::new();
    let (mut ran_out, mut full) = (0usize, 0usize);
    for (caller, answer) in &answers {
        *statuses.entry(answer.status).or_default() += 1;
        let latency_ms = (answer.latency.as_millis() as u64).max(1);
        match (answer.status, waited.get(caller)) {
            (201, Some((ms, event_id))) => {
                let _ = served_wait.record((*ms).max(1));
                let _ = served_latency.record(latency_ms);
                served.push(Served {
                    track: answer.track,
                    index: answer.index,
                    sent: answer.sent,
                    event_id: *event_id,
                });
            }
            (201, None) => {
                let _ = immediate_latency.record(latency_ms);
            }
            (409, _) if answer.had_position => ran_out += 1,
            (409, _) => full += 1,
            _ => {}
        }
    }
    let out_of_order = overtaken(&served);
    let quantile = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
    let report = serde_json::json!({
        "students": shape.students,
        "arrival_gap_ms": shape.arrival_gap.as_millis() as u64,
        "wait_s": shape.wait_s,
        "supply": shape.supply,
        "supply_batch": shape.supply_batch,
        "supply_gap_ms": shape.supply_gap.as_millis() as u64,
        "elapsed_s": elapsed.as_secs_f64(),
        "statuses": statuses,
        "served_at_once": immediate_latency.len(),
        "served_from_line": served.len(),
        "wait_p50_ms": quantile(&served_wait, 0.50),
        "wait_p99_ms": quantile(&served_wait, 0.99),
        "wait_max_ms": quantile(&served_wait, 1.0),
        "served_latency_p50_ms": quantile(&served_latency, 0.50),
        "served_latency_p99_ms": quantile(&served_latency, 0.99),
        "out_of_order_by_track": out_of_order
            .iter()
            .map(|(track, list)| (tracks[*track].clone(), list.len()))
            .collect::<BTreeMap<_, _>>(),
        "out_of_order": out_of_order.values().map(Vec::len).sum::<usize>(),
        // The widest gap between an overtaken student's send and its overtaker's: arrivals
        // sent within the client's and server's scheduling jitter may reach the line swapped.
        "out_of_order_max_sent_later_ms": out_of_order
            .values()
            .flatten()
            .map(|o| o.sent_later.as_secs_f64() * 1000.0)
            .fold(None, |max: Option<f64>, ms| Some(max.map_or(ms, |m| m.max(ms)))),
        "out_of_order_examples": out_of_order
            .values()
            .flatten()
            .take(20)
            .map(|o| serde_json::json!({"student": o.index, "overtaken_by": o.by, "sent_later_ms": o.sent_later.as_secs_f64() * 1000.0}))
            .collect::<Vec<_>>(),
        "timed_out_409": ran_out,
        "full_409": full,
        "line_peak": peak,
        "line_peak_by_track": peak_by_track,
        "supply_registered_at_s": registered
            .iter()
            .map(|(at, n)| serde_json::json!([at.as_secs_f64(), n]))
            .collect::<Vec<_>>(),
    });
    println!(
        "waiting line: {} students in {:.1} s, statuses {statuses:?}; {} served at once, {} from the line (waited p50 {:?} ms, p99 {:?} ms); {} served out of arrival order; {ran_out} 409 after the wait, {full} 409 line full; line peak {peak}",
        shape.students,
        elapsed.as_secs_f64(),
        immediate_latency.len(),
        served.len(),
        quantile(&served_wait, 0.50),
        quantile(&served_wait, 0.99),
        out_of_order.values().map(Vec::len).sum::<usize>(),
    );
    Ok(report)
}

#[cfg(test)]
mod order_tests {
    use super::*;

    /// A student answered before an earlier arrival of its track counts that one as overtaken;
    /// other tracks do not mix in.
    #[test]
    fn overtaken_counts_students_served_after_a_later_arrival() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let student = |track, index: usize, event_id| Served {
            track,
            index,
            sent: Duration::from_millis(index as u64 * 10),
            event_id,
        };
        let in_order = [
            student(0, 0, ids[0]),
            student(0, 4, ids[1]),
            student(1, 1, ids[0]),
            student(0, 8, ids[2]),
        ];
        assert!(overtaken(&in_order).values().all(Vec::is_empty));
        let swapped = [
            student(0, 0, ids[0]),
            student(0, 8, ids[1]),
            student(0, 4, ids[2]),
            student(1, 1, ids[3]),
        ];
        let by_track = overtaken(&swapped);
        let expected = Overtaken {
            index: 4,
            by: 8,
            sent_later: Duration::from_millis(40),
        };
        assert_eq!(by_track.get(&0).map(Vec::as_slice), Some(&[expected][..]));
        assert_eq!(by_track.get(&1).map(Vec::len), Some(0));
    }
}
