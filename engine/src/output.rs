//! A job's durable output in Kafka: every result to `results.<tenant>`, every malformed
//! input record to `dead.<tenant>` (formats in `clickpulse_protocol::results` and
//! `clickpulse_protocol::dead`).
//!
//! One idempotent producer per job (no duplicates or reordering when librdkafka retries);
//! both topics have one partition, so each holds the job's output in order. Sending never
//! blocks the job on the network: records queue in librdkafka and a full queue waits a moment
//! (backpressure), never drops. Delivery failures are counted and logged; the job reports them
//! when it stops.

use std::time::Duration;

use clickpulse_protocol::dead::{REASON_HEADER, SOURCE_HEADER, SourcePosition};
use clickpulse_protocol::results::ResultMsg;
use clickpulse_protocol::{Tenant, topics};
use clickpulse_replay::KafkaConfig;
use clickpulse_replay::kafka::{Acks, ensure_topics};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

/// Why the output cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output topics: {0}")]
    Topics(Box<clickpulse_replay::KafkaSinkError>),
    #[error("output producer: {0}")]
    Kafka(#[from] KafkaError),
}

impl From<clickpulse_replay::KafkaSinkError> for OutputError {
    fn from(error: clickpulse_replay::KafkaSinkError) -> Self {
        OutputError::Topics(Box::new(error))
    }
}

/// The producer of one job's output.
pub struct Output {
    producer: ThreadedProducer<Acks>,
    results: String,
    dead: String,
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
        ensure_topics(&config, &[results.clone(), dead.clone()], 1, 1)?;
        tracing::debug!(%results, %dead, ms = started.elapsed().as_millis() as u64, "output topics ready");
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set(
                "delivery.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create_with_context(Acks::default())?;
        Ok(Output {
            producer,
            results,
            dead,
        })
    }

    /// Queues a result (key: its stream; value: its JSON).
    pub async fn result(&self, msg: &ResultMsg) -> Result<(), OutputError> {
        let json = msg.to_json();
        let key = msg.stream().as_str();
        self.send(BaseRecord::to(&self.results).key(key).payload(&json))
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
        let mut record = BaseRecord::<[u8], [u8]>::to(&self.dead).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.send(record).await
    }

    async fn send<K, P>(&self, mut record: BaseRecord<'_, K, P>) -> Result<(), OutputError>
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
        let context = self.producer.context();
        if let Some(error) = context.first_error() {
            tracing::error!(failed = context.failed(), first = %error, "output records failed");
        }
        context.failed()
    }
}
