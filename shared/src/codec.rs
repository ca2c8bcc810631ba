//! The one wire codec: serde types encoded with bincode 2, with every decode bounded.
//!
//! Messages are framed as a 4-byte big-endian length followed by the bincode body. The length
//! is checked against [`MAX_MESSAGE_LEN`] before anything is allocated, and bincode itself is
//! configured with the same limit so that a hostile length *inside* the body (a `Vec` claiming
//! four billion elements) fails instead of allocating.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest message either side accepts, frame header excluded.
///
/// A deploy spec with hooks and environment fits in a few KiB; 1 MiB leaves room without
/// letting a peer make us buffer an arbitrary amount.
pub const MAX_MESSAGE_LEN: usize = 1024 * 1024;

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 4;

type Config = bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_MESSAGE_LEN>,
>;

fn config() -> Config {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<MAX_MESSAGE_LEN>()
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The frame header announces more than [`MAX_MESSAGE_LEN`] bytes.
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit")]
    TooLong(usize),
    /// The bytes do not form a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A valid message was followed by bytes that belong to nothing.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
}

/// Encodes `message` into a frame body (no length header).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    let body = bincode::serde::encode_to_vec(message, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if body.len() > MAX_MESSAGE_LEN {
        return Err(CodecError::TooLong(body.len()));
    }
    Ok(body)
}

/// Decodes a frame body into `T`, refusing oversize input and trailing garbage.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    if body.len() > MAX_MESSAGE_LEN {
        return Err(CodecError::TooLong(body.len()));
    }
    let (message, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - used));
    }
    Ok(message)
}

/// Encodes `message` with its 4-byte length header, ready to write to a stream.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    let body = encode(message)?;
    let len = u32::try_from(body.len()).map_err(|_| CodecError::TooLong(body.len()))?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads a frame header and returns the body length it announces, refusing oversize frames
/// before the caller allocates a buffer for the body.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(CodecError::TooLong(len));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Sample {
        id: u64,
        name: String,
        items: Vec<String>,
    }

    fn sample() -> Sample {
        Sample {
            id: 7,
            name: "web-1".into(),
            items: vec!["a".into(), "bc".into()],
        }
    }

    #[test]
    fn round_trips() {
        let body = encode(&sample()).expect("encode");
        assert_eq!(decode::<Sample>(&body).expect("decode"), sample());
    }

    #[test]
    fn frame_round_trips_through_header() {
        let frame = encode_frame(&sample()).expect("encode");
        let header: [u8; 4] = frame[..4].try_into().expect("header");
        let len = frame_len(header).expect("len");
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode::<Sample>(&frame[4..]).expect("decode"), sample());
    }

    #[test]
    fn oversize_frame_header_is_refused_before_allocation() {
        let header = u32::MAX.to_be_bytes();
        assert_eq!(
            frame_len(header),
            Err(CodecError::TooLong(u32::MAX as usize))
        );
    }

    #[test]
    fn hostile_inner_length_is_refused() {
        // A varint-encoded element count of u64::MAX for `items`, then nothing.
        let mut body = encode(&Sample {
            items: vec![],
            ..sample()
        })
        .expect("encode");
        body.pop(); // drop the empty vec's length (0)
        body.extend_from_slice(&[0xFF]);
        body.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            decode::<Sample>(&body),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = encode(&sample()).expect("encode");
        body.push(0);
        assert_eq!(decode::<Sample>(&body), Err(CodecError::TrailingBytes(1)));
    }

    #[test]
    fn truncated_input_is_refused_at_every_length() {
        let body = encode(&sample()).expect("encode");
        for cut in 0..body.len() {
            assert!(
                decode::<Sample>(&body[..cut]).is_err(),
                "cut at {cut} decoded"
            );
        }
    }
}

/// Reading and writing frames on async streams (QUIC streams in practice). Generic over
/// tokio's traits, so the bounds are tested here with in-memory pipes.
#[cfg(feature = "io")]
pub mod io {
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{decode, encode_frame, frame_len, CodecError, FRAME_HEADER_LEN};

    /// Why a frame could not be read or written.
    #[derive(Debug, thiserror::Error)]
    #[non_exhaustive]
    pub enum FrameError {
        #[error("stream: {0}")]
        Io(#[from] std::io::Error),
        #[error(transparent)]
        Codec(#[from] CodecError),
    }

    /// Reads one frame. `Ok(None)` when the stream ended cleanly before a new frame began.
    pub async fn read_frame<T, R>(reader: &mut R) -> Result<Option<T>, FrameError>
    where
        T: DeserializeOwned,
        R: AsyncRead + Unpin,
    {
        let mut header = [0u8; FRAME_HEADER_LEN];
        let first = reader.read(&mut header[..1]).await?;
        if first == 0 {
            return Ok(None);
        }
        reader.read_exact(&mut header[1..]).await?;
        let len = frame_len(header)?;
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).await?;
        Ok(Some(decode(&body)?))
    }

    /// Writes one frame.
    pub async fn write_frame<T, W>(writer: &mut W, message: &T) -> Result<(), FrameError>
    where
        T: Serialize,
        W: AsyncWrite + Unpin,
    {
        writer.write_all(&encode_frame(message)?).await?;
        Ok(())
    }

    /// Reads frames from a stream, keeping what has arrived of a frame between calls: unlike
    /// [`read_frame`], [`FrameReader::next`] may be cancelled (a `select!` with a timer) and
    /// called again without losing bytes.
    #[derive(Debug)]
    pub struct FrameReader<R> {
        reader: R,
        buffer: Vec<u8>,
    }

    impl<R: AsyncRead + Unpin> FrameReader<R> {
        pub fn new(reader: R) -> Self {
            Self {
                reader,
                buffer: Vec::new(),
            }
        }

        /// The next frame. `Ok(None)` when the stream ended cleanly between frames. Cancel
        /// safe: its only await is a `read_buf`, which either read bytes into the buffer or
        /// did nothing.
        pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
            loop {
                if let Some(header) = self.buffer.first_chunk::<FRAME_HEADER_LEN>() {
                    let len = frame_len(*header)?;
                    let end = FRAME_HEADER_LEN + len;
                    if self.buffer.len() >= end {
                        let message = decode(&self.buffer[FRAME_HEADER_LEN..end]);
                        self.buffer.drain(..end);
                        return Ok(Some(message?));
                    }
                    // The length is bounded, so this is at most one frame's worth.
                    self.buffer.reserve(end - self.buffer.len());
                }
                if self.reader.read_buf(&mut self.buffer).await? == 0 {
                    if self.buffer.is_empty() {
                        return Ok(None);
                    }
                    return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }

        /// The stream read from.
        pub fn get_mut(&mut self) -> &mut R {
            &mut self.reader
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[tokio::test]
        async fn a_frame_reader_survives_cancellation_mid_frame() {
            let (mut a, b) = tokio::io::duplex(1024);
            let mut frames = FrameReader::new(b);
            let frame = super::super::encode_frame(&("split".to_string(), 9u32)).expect("enc");
            a.write_all(&frame[..3]).await.expect("write");
            // Cancelled while only part of the header has arrived.
            let waited = tokio::time::timeout(
                std::time::Duration::from_millis(20),
                frames.next::<(String, u32)>(),
            )
            .await;
            assert!(waited.is_err());
            a.write_all(&frame[3..7]).await.expect("write");
            let waited = tokio::time::timeout(
                std::time::Duration::from_millis(20),
                frames.next::<(String, u32)>(),
            )
            .await;
            assert!(waited.is_err());
            a.write_all(&frame[7..]).await.expect("write");
            a.write_all(&frame).await.expect("write");
            drop(a);
            for _ in 0..2 {
                let got: Option<(String, u32)> = frames.next().await.expect("read");
                assert_eq!(got, Some(("split".into(), 9)));
            }
            let end: Option<(String, u32)> = frames.next().await.expect("eof");
            assert_eq!(end, None);
        }

        #[tokio::test]
        async fn a_frame_reader_refuses_oversize_and_truncated_frames() {
            let (mut a, b) = tokio::io::duplex(64);
            a.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
            let got: Result<Option<String>, _> = FrameReader::new(b).next().await;
            assert!(matches!(
                got,
                Err(FrameError::Codec(CodecError::TooLong(_)))
            ));
            let (mut a, b) = tokio::io::duplex(64);
            a.write_all(&10u32.to_be_bytes()).await.expect("write");
            a.write_all(b"abc").await.expect("write");
            drop(a);
            let got: Result<Option<String>, _> = FrameReader::new(b).next().await;
            assert!(matches!(got, Err(FrameError::Io(_))));
        }

        #[tokio::test]
        async fn frames_cross_a_pipe_and_eof_is_clean() {
            let (mut a, mut b) = tokio::io::duplex(1024);
            write_frame(&mut a, &("hello".to_string(), 7u32))
                .await
                .expect("write");
            drop(a);
            let got: Option<(String, u32)> = read_frame(&mut b).await.expect("read");
            assert_eq!(got, Some(("hello".into(), 7)));
            let end: Option<(String, u32)> = read_frame(&mut b).await.expect("eof");
            assert_eq!(end, None);
        }

        #[tokio::test]
        async fn oversize_header_is_refused_without_reading_the_body() {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
            let got: Result<Option<String>, _> = read_frame(&mut b).await;
            assert!(matches!(
                got,
                Err(FrameError::Codec(CodecError::TooLong(_)))
            ));
        }

        #[tokio::test]
        async fn truncated_frame_is_an_error_not_a_hang() {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(&10u32.to_be_bytes()).await.expect("write");
            a.write_all(b"abc").await.expect("write");
            drop(a);
            let got: Result<Option<String>, _> = read_frame(&mut b).await;
            assert!(matches!(got, Err(FrameError::Io(_))));
        }
    }
}
