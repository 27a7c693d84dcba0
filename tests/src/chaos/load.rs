//! The mixed student load of the fault tests and the soak bench: allocate, replay the
//! allocation, mark it for deletion — over real HTTP, checking every answer as it comes.
//!
//! Each student works through fresh callers. An allocation is retried with the same caller until
//! it is answered (a 503 or a dropped connection says nothing about whether it committed; the
//! retry must return the same sandbox if it did). Every answer is checked: a 5xx other than 503
//! is a violation, and so is a 503 without `Retry-After` or without the error envelope, or a
//! replay that returns another sandbox than the first answer did.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::app::TRACK_TOKEN;

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// HTTP requests sent (answered or not).
    pub operations: u64,
    /// Answers by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection refused or reset: a process was down).
    pub unanswered: u64,
    /// 503s that carried `Retry-After` and the error envelope.
    pub well_formed_503: u64,
    /// caller → the sandbox its allocation was acknowledged with (201 or 200).
    pub acknowledged: BTreeMap<String, String>,
    /// Callers whose allocation was answered only on a retry with 200 (a replay): the earlier
    /// attempt had committed without its answer reaching the student.
    pub recognised_on_retry: BTreeSet<String>,
    /// Callers that were never answered (gave up when the load stopped).
    pub unacknowledged: BTreeSet<String>,
    /// Sandboxes whose mark-for-deletion was acknowledged.
    pub marked: BTreeSet<String>,
    /// Broken promises seen on the wire (must stay empty).
    pub violations: Vec<String>,
    /// Answered requests' latency in microseconds, by operation (`allocate`, `replay`, `mark`):
    /// the soak prints percentiles per minute to show which request slows down as the store grows.
    pub latency_us: BTreeMap<&'static str, Vec<u64>>,
}

impl LoadReport {
    fn merge(&mut self, other: LoadReport) {
        self.operations += other.operations;
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        self.unanswered += other.unanswered;
        self.well_formed_503 += other.well_formed_503;
        self.acknowledged.extend(other.acknowledged);
        self.recognised_on_retry.extend(other.recognised_on_retry);
        self.unacknowledged.extend(other.unacknowledged);
        self.marked.extend(other.marked);
        self.violations.extend(other.violations);
        for (op, samples) in other.latency_us {
            self.latency_us.entry(op).or_default().extend(samples);
        }
    }

    /// The `q` quantile (0–1) of `op`'s latency in milliseconds; `None` without samples.
    pub fn latency_ms(&self, op: &str, q: f64) -> Option<f64> {
        let mut samples = self.latency_us.get(op)?.clone();
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let index = ((samples.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(samples[index] as f64 / 1000.0)
    }
}

/// Load settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `http://127.0.0.1:port` of the API (a restarted process comes back on the same one).
    pub url: String,
    /// Concurrent students.
    pub students: usize,
    /// Chance that an acknowledged allocation is replayed once.
    pub replay_chance: f64,
    /// Chance that an acknowledged allocation is then marked for deletion.
    pub mark_chance: f64,
    /// Seed of the students' choices.
    pub seed: u64,
    /// A student's pause between two callers (keeps a finite pool from running dry at once).
    pub think: Duration,
    /// Prefix of the callers' names, so that runs against the same store use fresh callers.
    pub caller_prefix: String,
}

enum Answer {
    /// Status and JSON body.
    Answered(u16, Value),
    /// No answer at all.
    Unanswered,
}

struct Student {
    client: reqwest::Client,
    url: String,
    report: LoadReport,
}

impl Student {
    async fn send(&mut self, op: &'static str, request: reqwest::RequestBuilder) -> Answer {
        self.report.operations += 1;
        let sent = std::time::Instant::now();
        let response = match request.send().await {
            Ok(r) => r,
            Err(_) => {
                self.report.unanswered += 1;
                return Answer::Unanswered;
            }
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key("retry-after");
        let body: Value = match response.json().await {
            Ok(v) => v,
            Err(_) => {
                self.report.unanswered += 1;
                return Answer::Unanswered;
            }
        };
        *self.report.by_status.entry(status).or_default() += 1;
        self.report
            .latency_us
            .entry(op)
            .or_default()
            .push(sent.elapsed().as_micros() as u64);
        if status == 503 {
            if retry_after && body["detail"]["code"].is_string() {
                self.report.well_formed_503 += 1;
            } else {
                self.report
                    .violations
                    .push(format!("503 without Retry-After or envelope: {body}"));
            }
        } else if status >= 500 {
            self.report.violations.push(format!("{status}: {body}"));
        }
        Answer::Answered(status, body)
    }

    fn allocate(&self, caller: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}/v1/allocate", self.url))
            .bearer_auth(TRACK_TOKEN)
            .header("X-Instruqt-Sandbox-ID", caller)
    }

    fn mark(&self, caller: &str, sandbox_id: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!(
                "{}/v1/sandboxes/{sandbox_id}/mark-for-deletion",
                self.url
            ))
            .bearer_auth(TRACK_TOKEN)
            .header("X-Instruqt-Sandbox-ID", caller)
    }

    /// Allocates for `caller` until answered or `stop`; returns the sandbox id.
    async fn allocate_until_answered(&mut self, caller: &str, stop: &AtomicBool) -> Option<String> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.send("allocate", self.allocate(caller)).await {
                Answer::Answered(status @ (200 | 201), body) => {
                    let id = body["sandbox_id"].as_str().unwrap_or_default().to_string();
                    if id.is_empty() {
                        self.report
                            .violations
                            .push(format!("{caller}: {status} without sandbox_id: {body}"));
                        return None;
                    }
                    if status == 200 && attempt > 1 {
                        self.report.recognised_on_retry.insert(caller.to_string());
                    }
                    self.report
                        .acknowledged
                        .insert(caller.to_string(), id.clone());
                    return Some(id);
                }
                Answer::Answered(503, _) | Answer::Unanswered => {}
                // The pool ran dry (a finite pool under steady allocation): a true answer,
                // nothing allocated; the student waits for the next caller.
                Answer::Answered(409, body)
                    if body["detail"]["code"] == "NO_SANDBOXES_AVAILABLE" =>
                {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return None;
                }
                Answer::Answered(status, body) => {
                    // Anything else (pool exhausted, a 5xx recorded above) ends this caller.
                    if status < 500 {
                        self.report
                            .violations
                            .push(format!("{caller}: allocate answered {status}: {body}"));
                    }
                    return None;
                }
            }
            if stop.load(Ordering::SeqCst) {
                self.report.unacknowledged.insert(caller.to_string());
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10)))).await;
        }
    }

    async fn run(
        mut self,
        index: usize,
        options: LoadOptions,
        stop: Arc<AtomicBool>,
    ) -> LoadReport {
        let mut rng = StdRng::seed_from_u64(options.seed.wrapping_add(index as u64));
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(options.think).await;
            n += 1;
            let caller = format!("{}student-{index}-{n}", options.caller_prefix);
            let Some(sandbox_id) = self.allocate_until_answered(&caller, &stop).await else {
                continue;
            };
            if rng.random_bool(options.replay_chance) {
                if let Answer::Answered(status, body) =
                    self.send("replay", self.allocate(&caller)).await
                {
                    let again = body["sandbox_id"].as_str().unwrap_or_default();
                    if (status == 200 || status == 201) && again != sandbox_id {
                        self.report.violations.push(format!(
                            "{caller}: replay returned {again}, first answer was {sandbox_id}"
                        ));
                    }
                }
            }
            if rng.random_bool(options.mark_chance) {
                for _ in 0..20 {
                    match self.send("mark", self.mark(&caller, &sandbox_id)).await {
                        Answer::Answered(200, _) => {
                            self.report.marked.insert(sandbox_id.clone());
                            break;
                        }
                        Answer::Answered(503, _) | Answer::Unanswered => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Answer::Answered(status, body) => {
                            self.report.violations.push(format!(
                                "{caller}: mark-for-deletion of {sandbox_id} answered {status}: {body}"
                            ));
                            break;
                        }
                    }
                }
            }
        }
        self.report
    }
}

/// Runs the load until `stop` is set; returns the merged report of every student.
pub async fn run(options: LoadOptions, stop: Arc<AtomicBool>) -> LoadReport {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let tasks: Vec<_> = (0..options.students)
        .map(|index| {
            let student = Student {
                client: client.clone(),
                url: options.url.clone(),
                report: LoadReport::default(),
            };
            tokio::spawn(student.run(index, options.clone(), stop.clone()))
        })
        .collect();
    let mut report = LoadReport::default();
    for task in tasks {
        match task.await {
            Ok(r) => report.merge(r),
            Err(e) => report.violations.push(format!("student task: {e}")),
        }
    }
    report
}
