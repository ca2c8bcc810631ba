//! Cursor pagination, the same on every list: `?limit=N&cursor=C`, and the answer's
//! `next_cursor` to pass back for the next page (absent on the last one).
//!
//! A cursor names the last row of a page by its sort key (a time, or a position) and its id,
//! so a page never repeats or skips a row when rows are added meanwhile, and it costs an
//! index range scan however deep the client pages. It is opaque to clients: base64url of the
//! two values, checked when decoded (a forged cursor can only move within the caller's own
//! account, since every query is still scoped to it).

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::error::{ApiError, ErrorCode};

/// Rows per page when the client does not say.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most rows a page may hold.
pub const MAX_LIMIT: i64 = 500;

#[derive(Deserialize, IntoParams, Default, Clone)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size (1–500, default 100).
    pub limit: Option<i64>,
    /// Continue after this point (`next_cursor` of the previous page).
    pub cursor: Option<String>,
}

/// Where a page ends: the sort key (microseconds since the epoch for lists sorted by time,
/// or a position) and the id that breaks ties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub key: i64,
    pub id: Uuid,
}

impl Cursor {
    /// The cursor after a row sorted by time.
    pub fn at(time: DateTime<Utc>, id: Uuid) -> Self {
        Self {
            key: time.timestamp_micros(),
            id,
        }
    }

    /// The time of a cursor made by [`Cursor::at`].
    pub fn time(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.key).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(24);
        raw.extend_from_slice(&self.key.to_be_bytes());
        raw.extend_from_slice(self.id.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(text: &str) -> Option<Self> {
        if text.len() > 64 {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let raw: [u8; 24] = raw.try_into().ok()?;
        let (key, id) = raw.split_at(8);
        Some(Self {
            key: i64::from_be_bytes(key.try_into().ok()?),
            id: Uuid::from_slice(id).ok()?,
        })
    }
}

/// A checked page request.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: i64,
    pub after: Option<Cursor>,
}

impl Page {
    /// How many rows to fetch: one more than the page, to know whether another page follows.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// Cuts `rows` (fetched with [`Page::fetch`]) to the page and gives the next cursor.
    pub fn finish<T>(
        &self,
        mut rows: Vec<T>,
        key: impl Fn(&T) -> Cursor,
    ) -> (Vec<T>, Option<String>) {
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        if rows.len() <= limit {
            return (rows, None);
        }
        rows.truncate(limit);
        let next = rows.last().map(|last| key(last).encode());
        (rows, next)
    }
}

/// Which way a list runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    OldestFirst,
    NewestFirst,
}

impl Page {
    /// The SQL condition "after the cursor" on `(time, id)` columns, with the cursor's time
    /// and id as parameters `$n` and `$n+1` (both NULL on the first page), and the matching
    /// ORDER BY and LIMIT (`$n+2`).
    pub fn keyset_sql(time: &str, id: &str, order: Order, n: usize) -> String {
        let (cmp, dir) = match order {
            Order::OldestFirst => (">", "ASC"),
            Order::NewestFirst => ("<", "DESC"),
        };
        format!(
            " AND (${n}::timestamptz IS NULL OR ({time}, {id}) {cmp} (${n}::timestamptz, ${m}::uuid)) \
             ORDER BY {time} {dir}, {id} {dir} LIMIT ${l}",
            m = n + 1,
            l = n + 2
        )
    }

    /// The cursor's time, for the first parameter of [`Page::keyset_sql`].
    pub fn after_time(&self) -> Option<DateTime<Utc>> {
        self.after.map(|c| c.time())
    }

    /// The cursor's id, for the second.
    pub fn after_id(&self) -> Option<Uuid> {
        self.after.map(|c| c.id)
    }
}

impl PageQuery {
    /// Checks the limit and decodes the cursor.
    pub fn page(&self) -> Result<Page, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidLimit,
                format!("limit must be between 1 and {MAX_LIMIT}"),
            ));
        }
        let after = match &self.cursor {
            None => None,
            Some(text) => Some(Cursor::decode(text).ok_or_else(|| {
                ApiError::bad_request(
                    ErrorCode::InvalidCursor,
                    "cursor is not one this API gave out; pass next_cursor unchanged",
                )
            })?),
        };
        Ok(Page { limit, after })
    }

    /// Reads `limit` and `cursor` from a raw query string (for lists that also take
    /// repeated parameters, which axum's `Query` cannot).
    pub fn from_raw(query: Option<&str>) -> Result<Self, ApiError> {
        let mut page = Self::default();
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match name.as_ref() {
                "limit" => {
                    page.limit = Some(value.parse().map_err(|_| {
                        ApiError::bad_request(ErrorCode::InvalidLimit, "limit must be a number")
                    })?)
                }
                "cursor" => page.cursor = Some(value.into_owned()),
                _ => {}
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let c = Cursor::at(Utc::now(), Uuid::new_v4());
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(
            Cursor::decode(&c.encode()).map(|d| d.time()),
            Some(c.time())
        );
        for bad in ["", "not base64!", "AAAA", &"A".repeat(65)] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn finish_cuts_the_extra_row_into_a_cursor() {
        let page = PageQuery {
            limit: Some(2),
            cursor: None,
        }
        .page()
        .expect("page");
        let id = Uuid::new_v4();
        let key = |n: &i64| Cursor { key: *n, id };
        let (rows, next) = page.finish(vec![1, 2, 3], key);
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(next, Some(Cursor { key: 2, id }.encode()));
        let (rows, next) = page.finish(vec![1, 2], key);
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(next, None);
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        for limit in [0, -1, MAX_LIMIT + 1] {
            let err = PageQuery {
                limit: Some(limit),
                cursor: None,
            }
            .page()
            .expect_err("refused");
            assert_eq!(err.code(), ErrorCode::InvalidLimit.as_str());
        }
    }
}
