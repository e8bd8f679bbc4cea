//! A job's durable output in Kafka: every result to `results.<tenant>`, every malformed
//! input record to `dead.<tenant>`, its checkpoints and history logs to the compacted
//! `state.<tenant>` (formats in `clickpulse_protocol::results`, `::dead` and `::state`).
//!
//! One idempotent producer per job (no duplicates or reordering when librdkafka retries);
//! each topic has one partition, so each holds the job's output in order — on `state.<tenant>`
//! that is what makes a manifest in the log mean its chunks and history are there too. Sending never
//! blocks the job on the network: records queue in librdkafka and a full queue waits a moment
//! (backpressure), never drops. Delivery failures are counted and logged; the job reports them
//! when it stops. A checkpoint's manifest is the one record waited for ([`Output::state_acked`]):
//! a checkpoint counts as written once the broker has it, not once it is queued, since a
//! producer that goes away drops what it still queues.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clickpulse_protocol::dead::{REASON_HEADER, SOURCE_HEADER, SourcePosition};
use clickpulse_protocol::results::ResultMsg;
use clickpulse_protocol::{Tenant, topics};
use clickpulse_replay::KafkaConfig;
use clickpulse_replay::kafka::{Acks, TopicSpec, ensure_topic_specs};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::oneshot;

/// Why the output cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output topics: {0}")]
    Topics(Box<clickpulse_replay::KafkaSinkError>),
    #[error("output producer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{topic}: record not acknowledged: {reason}")]
    NotAcknowledged { topic: String, reason: String },
}

impl From<clickpulse_replay::KafkaSinkError> for OutputError {
    fn from(error: clickpulse_replay::KafkaSinkError) -> Self {
        OutputError::Topics(Box::new(error))
    }
}

/// The output producer's delivery reports: counted, and handed to whoever waits for one
/// (a record's delivery opaque is the id it waits under; 0 for records nobody waits for).
#[derive(Default)]
pub struct OutputAcks {
    counts: Acks,
    waiting: Mutex<HashMap<usize, oneshot::Sender<Result<(), String>>>>,
    last_id: AtomicUsize,
}

impl OutputAcks {
    /// A new id to wait under, and the report's receiver.
    fn wait(&self) -> (usize, oneshot::Receiver<Result<(), String>>) {
        let id = self.last_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.waiting_map().insert(id, tx);
        (id, rx)
    }

    fn waiting_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<usize, oneshot::Sender<Result<(), String>>>> {
        // Nothing can be left half-done in the map by a panic: take it as it is.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for OutputAcks {}

impl ProducerContext for OutputAcks {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        self.counts.delivery(result, ());
        if id != 0
            && let Some(waiting) = self.waiting_map().remove(&id)
        {
            // The waiter may have given up; nothing to tell then.
            let _ = waiting.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
        }
    }
}

/// The producer of one job's output.
pub struct Output {
    producer: ThreadedProducer<OutputAcks>,
    results: String,
    dead: String,
    state: String,
}

/// How long a queued record may wait for the broker (librdkafka retries within it).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl Output {
    /// Creates the tenant's output topics when missing, and the producer. Blocking.
    pub fn connect(brokers: &str, tenant: &Tenant) -> Result<Output, OutputError> {
        let (results, dead) = (topics::results(tenant), topics::dead(tenant));
        let config = KafkaConfig {
            brokers: brokers.to_owned(),
            connect_timeout: Duration::from_secs(10),
            delivery_timeout: DELIVERY_TIMEOUT,
        };
        let started = std::time::Instant::now();
        let state = topics::state(tenant);
        let spec = |name| TopicSpec {
            name,
            partitions: 1,
            replication: 1,
            configs: &[],
        };
        ensure_topic_specs(
            &config,
            &[
                spec(&results),
                spec(&dead),
                TopicSpec {
                    configs: &[("cleanup.policy", "compact")],
                    ..spec(&state)
                },
            ],
        )?;
        tracing::debug!(%results, %dead, ms = started.elapsed().as_millis() as u64, "output topics ready");
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Checkpoint chunks are up to 512 KiB (protocol::state::CHUNK_BYTES).
            .set("message.max.bytes", "1048576")
            .set(
                "delivery.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create_with_context(OutputAcks::default())?;
        Ok(Output {
            producer,
            results,
            dead,
            state,
        })
    }

    /// Queues a result (key: its stream; value: its JSON).
    pub async fn result(&self, msg: &ResultMsg) -> Result<(), OutputError> {
        let json = msg.to_json();
        let key = msg.stream().as_str();
        self.send(
            BaseRecord::with_opaque_to(&self.results, 0)
                .key(key)
                .payload(&json),
        )
        .await
    }

    /// Queues a dead letter: the source record unchanged, with why and where from.
    pub async fn dead_letter(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        reason: &str,
        source: &SourcePosition,
    ) -> Result<(), OutputError> {
        let source = source.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: REASON_HEADER,
                value: Some(reason),
            })
            .insert(Header {
                key: SOURCE_HEADER,
                value: Some(&source),
            });
        let mut record =
            BaseRecord::<[u8], [u8], usize>::with_opaque_to(&self.dead, 0).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.send(record).await
    }

    /// Queues a `state.<tenant>` record (`None`: a tombstone).
    pub async fn state(&self, key: &str, value: Option<&[u8]>) -> Result<(), OutputError> {
        self.send(self.state_record(key, value, 0)).await
    }

    /// Queues a `state.<tenant>` record and waits until the broker has acknowledged it
    /// (librdkafka retries for up to the delivery timeout). Records queued before it are in
    /// the log before it: the topic has one partition and the producer is idempotent.
    pub async fn state_acked(&self, key: &str, value: Option<&[u8]>) -> Result<(), OutputError> {
        let acks = self.producer.context();
        let (id, acked) = acks.wait();
        if let Err(error) = self.send(self.state_record(key, value, id)).await {
            acks.waiting_map().remove(&id);
            return Err(error);
        }
        let reason = match acked.await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(reason)) => reason,
            Err(_) => "the producer went away first".to_owned(),
        };
        Err(OutputError::NotAcknowledged {
            topic: self.state.clone(),
            reason,
        })
    }

    fn state_record<'a>(
        &'a self,
        key: &'a str,
        value: Option<&'a [u8]>,
        id: usize,
    ) -> BaseRecord<'a, str, [u8], usize> {
        let record = BaseRecord::with_opaque_to(&self.state, id).key(key);
        match value {
            Some(value) => record.payload(value),
            None => record,
        }
    }

    /// Records queued and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    async fn send<K, P>(&self, mut record: BaseRecord<'_, K, P, usize>) -> Result<(), OutputError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }

    /// Waits (blocking, at most `timeout`) until everything queued is acknowledged or has
    /// failed; returns how many records failed in all.
    pub fn flush(&self, timeout: Duration) -> u64 {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, in_flight = self.producer.in_flight_count(), "output not all acknowledged at stop");
        }
        let context = &self.producer.context().counts;
        if let Some(error) = context.first_error() {
            tracing::error!(failed = context.failed(), first = %error, "output records failed");
        }
        context.failed()
    }
}
