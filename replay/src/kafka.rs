//! The Kafka side of the replayer: an idempotent producer, topic creation, and the error
//! handling that turns a missing or vanishing broker into a clear, bounded failure.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

/// Connection settings for the broker.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// How long to keep trying to reach the broker at start-up.
    pub connect_timeout: Duration,
    /// How long a record may wait for acknowledgement (librdkafka retries inside this bound).
    pub delivery_timeout: Duration,
}

impl KafkaConfig {
    /// `brokers` with the default bounds: 20 s to reach the broker, 30 s per acknowledgement.
    ///
    /// ```
    /// let config = clickpulse_replay::KafkaConfig::new("127.0.0.1:9092");
    /// assert_eq!(config.delivery_timeout.as_secs(), 30);
    /// ```
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            connect_timeout: Duration::from_secs(20),
            delivery_timeout: Duration::from_secs(30),
        }
    }
}

/// What went wrong talking to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("cannot create a Kafka client for {brokers}")]
    Client { brokers: String, source: KafkaError },
    #[error(
        "cannot reach the Kafka broker at {brokers} after {attempts} attempts over {waited:.1?} \
         (is it running? check --brokers): {last_error}"
    )]
    Unreachable {
        brokers: String,
        attempts: u32,
        waited: Duration,
        last_error: KafkaError,
    },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("topic {topic} did not appear in the broker's metadata within {0:?}", .waited)]
    TopicNotVisible { topic: String, waited: Duration },
    #[error(
        "the broker did not acknowledge {failed} records (first failure: {first_error}); \
         the broker went away or rejected them — the replay stopped"
    )]
    Delivery { failed: u64, first_error: String },
    #[error("{pending} records still unacknowledged after waiting {timeout:?} at the end")]
    FlushTimeout { pending: u64, timeout: Duration },
    #[error("cannot produce to {topic}")]
    Produce { topic: String, source: KafkaError },
}

/// Counts acknowledgements from the producer's delivery callbacks.
#[derive(Default)]
pub struct Acks {
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Acks {
    /// Records the broker acknowledged.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Records that definitely failed.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The first delivery failure, if any.
    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|e| e.clone())
    }
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| error.to_string());
                }
            }
        }
    }
}

/// An idempotent producer that remembers how many records it sent and how many were acked.
pub struct KafkaSink {
    producer: BaseProducer<Acks>,
    config: KafkaConfig,
    sent: u64,
}

fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        // Surface a dead broker quickly instead of librdkafka's silent reconnect loop.
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("reconnect.backoff.max.ms", "2000");
    c
}

/// Creates the topics that do not exist yet (`partitions` each) and waits until the broker
/// lists them. Used by the replayer for `clicks.<tenant>` and by jobs for their output topics.
pub fn ensure_topics(
    config: &KafkaConfig,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaSinkError> {
    ensure_topics_with(config, topics, partitions, replication, &[])
}

/// [`ensure_topics`] with topic configs for the topics it creates (e.g.
/// `cleanup.policy=compact`); an existing topic is left as it is.
pub fn ensure_topics_with(
    config: &KafkaConfig,
    topics: &[String],
    partitions: i32,
    replication: i32,
    configs: &[(&str, &str)],
) -> Result<(), KafkaSinkError> {
    let specs: Vec<TopicSpec<'_>> = topics
        .iter()
        .map(|name| TopicSpec {
            name,
            partitions,
            replication,
            configs,
        })
        .collect();
    ensure_topic_specs(config, &specs)
}

/// A topic for [`ensure_topic_specs`] to create when missing.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    pub replication: i32,
    /// Topic configs, e.g. `("cleanup.policy", "compact")`.
    pub configs: &'a [(&'a str, &'a str)],
}

/// Creates the missing topics of `specs` in one request and waits until the broker lists
/// them all; an existing topic is left as it is. A job creates its output topics this way
/// at its first start, so the wait is short: one request, and a metadata check that backs
/// off from 5 ms (the fixed 100 ms sleeps it had, once per group of topics, cost a first
/// start 200 ms).
pub fn ensure_topic_specs(
    config: &KafkaConfig,
    specs: &[TopicSpec<'_>],
) -> Result<(), KafkaSinkError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(config)
            .create()
            .map_err(|source| KafkaSinkError::Client {
                brokers: config.brokers.clone(),
                source,
            })?;
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|spec| {
            spec.configs.iter().fold(
                NewTopic::new(
                    spec.name,
                    spec.partitions,
                    TopicReplication::Fixed(spec.replication),
                ),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = futures_executor::block_on(admin.create_topics(&new, &opts)).map_err(|e| {
        KafkaSinkError::CreateTopic {
            topic: specs.iter().map(|s| s.name).collect::<Vec<_>>().join(","),
            reason: e.to_string(),
        }
    })?;
    for result in results {
        match result {
            Ok(topic) => {
                let partitions = specs
                    .iter()
                    .find(|s| s.name == topic)
                    .map_or(0, |s| s.partitions);
                tracing::info!(%topic, partitions, "topic created")
            }
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(%topic, "topic exists")
            }
            Err((topic, code)) => {
                return Err(KafkaSinkError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    let deadline = Duration::from_secs(15);
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    let mut waiting: Vec<&str> = specs.iter().map(|s| s.name).collect();
    loop {
        // One topic per metadata request: a cluster can hold thousands of topics.
        waiting.retain(|&name| {
            let visible = admin
                .inner()
                .fetch_metadata(Some(name), Duration::from_secs(2))
                .is_ok_and(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == name && t.error().is_none() && !t.partitions().is_empty()
                    })
                });
            !visible
        });
        let Some(&topic) = waiting.first() else {
            return Ok(());
        };
        if start.elapsed() > deadline {
            return Err(KafkaSinkError::TopicNotVisible {
                topic: topic.to_owned(),
                waited: deadline,
            });
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

impl KafkaSink {
    /// Creates the producer and waits until the broker answers, retrying with exponential
    /// backoff for at most `connect_timeout`.
    pub fn connect(config: &KafkaConfig) -> Result<Self, KafkaSinkError> {
        let producer: BaseProducer<Acks> = client_config(config)
            // Idempotence: no duplicates and per-partition order even when librdkafka retries.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.delivery_timeout.as_millis().to_string(),
            )
            // Throughput: big batches of small records.
            .set("linger.ms", "20")
            .set("batch.num.messages", "100000")
            .set("batch.size", "4000000")
            .set("queue.buffering.max.messages", "2000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("compression.type", "lz4")
            // The partitioner of the Java client, so keys land where Java producers put them.
            .set("partitioner", "murmur2_random")
            .create_with_context(Acks::default())
            .map_err(|source| KafkaSinkError::Client {
                brokers: config.brokers.clone(),
                source,
            })?;
        wait_for_broker(&config.brokers, config.connect_timeout, |t| {
            producer.client().fetch_metadata(None, t).map(|_| ())
        })?;
        Ok(KafkaSink {
            producer,
            config: config.clone(),
            sent: 0,
        })
    }

    /// Creates the topics that do not exist yet and waits until the broker lists them.
    pub fn ensure_topics(
        &self,
        topics: &[String],
        partitions: i32,
        replication: i32,
    ) -> Result<(), KafkaSinkError> {
        ensure_topics(&self.config, topics, partitions, replication)
    }

    /// Queues one record stamped with its event time (so consumers can seek by event time with
    /// `offsets_for_times`); when librdkafka's queue is full, serves acknowledgements until
    /// there is room. Fails as soon as any earlier record has definitely failed.
    pub fn send(
        &mut self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        event_time_ms: i64,
    ) -> Result<(), KafkaSinkError> {
        let mut record = BaseRecord::to(topic)
            .key(key)
            .payload(value)
            .timestamp(event_time_ms);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(5));
                    self.check_failures()?;
                }
                Err((source, _)) => {
                    return Err(KafkaSinkError::Produce {
                        topic: topic.to_owned(),
                        source,
                    });
                }
            }
        }
        self.sent += 1;
        if self.sent.is_multiple_of(4096) {
            self.producer.poll(Duration::ZERO);
            self.check_failures()?;
        }
        Ok(())
    }

    /// Serves delivery callbacks for up to `timeout` (the pacer calls this while it waits).
    pub fn poll(&self, timeout: Duration) -> Result<(), KafkaSinkError> {
        self.producer.poll(timeout);
        self.check_failures()
    }

    fn check_failures(&self) -> Result<(), KafkaSinkError> {
        let acks = self.producer.context();
        let failed = acks.failed.load(Ordering::Relaxed);
        if failed == 0 {
            return Ok(());
        }
        let first_error = acks
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "unknown".into());
        Err(KafkaSinkError::Delivery {
            failed,
            first_error,
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn acknowledged(&self) -> u64 {
        self.producer.context().delivered.load(Ordering::Relaxed)
    }

    /// Waits until every sent record is acknowledged, or fails.
    pub fn finish(&self) -> Result<(), KafkaSinkError> {
        let timeout = self.config.delivery_timeout + Duration::from_secs(5);
        let flushed = self.producer.flush(timeout);
        self.check_failures()?;
        let pending = self.sent - self.acknowledged();
        if flushed.is_err() || pending > 0 {
            return Err(KafkaSinkError::FlushTimeout { pending, timeout });
        }
        Ok(())
    }
}

/// Calls `probe` until it succeeds, backing off exponentially, for at most `budget`.
fn wait_for_broker(
    brokers: &str,
    budget: Duration,
    probe: impl Fn(Duration) -> Result<(), KafkaError>,
) -> Result<(), KafkaSinkError> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(200);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let remaining = budget.saturating_sub(start.elapsed());
        let error = match probe(remaining.clamp(Duration::from_millis(100), Duration::from_secs(1)))
        {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if start.elapsed() + backoff >= budget {
            return Err(KafkaSinkError::Unreachable {
                brokers: brokers.to_owned(),
                attempts,
                waited: start.elapsed(),
                last_error: error,
            });
        }
        tracing::warn!(brokers, attempts, %error, retry_in_ms = backoff.as_millis() as u64, "broker not reachable yet");
        thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
