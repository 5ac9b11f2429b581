//! Duration and size values of the config: the one reader of each, with
//! typed errors naming the key.

use std::fmt;
use std::time::Duration;

use super::{SIZE_ALIGN, SIZE_EXAMPLES};

/// Why one key's value was refused: the key (`volume[0].size`) and what is
/// wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ValueError {
    pub key: String,
    pub problem: ValueProblem,
}

/// What is wrong with a duration or size value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueProblem {
    /// humantime could not read it; `reason` is humantime's.
    #[error("{value:?} is not a duration ({reason}; examples: {examples})")]
    NotADuration {
        value: String,
        reason: String,
        examples: &'static str,
    },
    #[error("must be {0}")]
    DurationOutOfRange(DurationRange),
    #[error(transparent)]
    Size(#[from] SizeError),
}

/// The durations a key accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationRange {
    AtLeast(Duration),
    AtMost(Duration),
    /// Both ends included.
    Between(Duration, Duration),
    AboveZero,
}

impl DurationRange {
    pub fn contains(self, d: Duration) -> bool {
        match self {
            DurationRange::AtLeast(min) => d >= min,
            DurationRange::AtMost(max) => d <= max,
            DurationRange::Between(min, max) => (min..=max).contains(&d),
            DurationRange::AboveZero => !d.is_zero(),
        }
    }
}

impl fmt::Display for DurationRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DurationRange::AtLeast(min) => write!(f, "at least {}", short(min)),
            DurationRange::AtMost(max) => write!(f, "at most {}", short(max)),
            DurationRange::Between(min, max) => {
                write!(f, "between {} and {}", short(min), short(max))
            }
            DurationRange::AboveZero => f.write_str("above 0"),
        }
    }
}

/// A bound as a config would spell it: `10ms`, `60s`, `1h`.
pub(super) fn short(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() == 0 {
        if s >= 3600 && s % 3600 == 0 {
            format!("{}h", s / 3600)
        } else {
            format!("{s}s")
        }
    } else if d.as_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Why a size was refused (by [`parse_size`] or as a config value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size ({SIZE_EXAMPLES})")]
    NotASize(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{0:?} has too many decimal places")]
    TooManyDecimals(String),
    #[error("{0:?} is not a whole number of bytes")]
    Fractional(String),
    #[error("{0} is negative ({SIZE_EXAMPLES})")]
    Negative(i64),
    #[error("expected a size string or an integer, found a {0} ({SIZE_EXAMPLES})")]
    WrongType(&'static str),
    #[error("must be greater than zero")]
    Zero,
    #[error("{0} bytes is not a multiple of {SIZE_ALIGN}")]
    Unaligned(u64),
}

/// The one duration reader of the config: key `key`'s value `raw` (absent:
/// `default`), a humantime duration within `range`. `examples` go into the
/// error for a value that does not parse.
pub(super) fn duration(
    raw: Option<&str>,
    key: &str,
    default: Duration,
    range: DurationRange,
    examples: &'static str,
) -> Result<Duration, ValueError> {
    let Some(t) = raw else { return Ok(default) };
    let problem = match humantime::parse_duration(t) {
        Ok(d) if range.contains(d) => return Ok(d),
        Ok(_) => ValueProblem::DurationOutOfRange(range),
        Err(e) => ValueProblem::NotADuration {
            value: t.to_owned(),
            reason: e.to_string(),
            examples,
        },
    };
    Err(ValueError {
        key: key.to_owned(),
        problem,
    })
}

/// The one size reader of the config: key `key`'s value `v` (absent:
/// `default`), see [`size_value`].
pub(super) fn size_or(v: Option<&toml::Value>, key: &str, default: u64) -> Result<u64, ValueError> {
    v.map_or(Ok(default), |v| size_value(v, key))
}

/// A size value: a size string ([`parse_size`]) or an integer, non-zero and
/// a multiple of [`SIZE_ALIGN`].
pub(super) fn size_value(v: &toml::Value, key: &str) -> Result<u64, ValueError> {
    let checked = || -> Result<u64, SizeError> {
        let n = match v {
            toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| SizeError::Negative(*i))?,
            toml::Value::String(s) => parse_size(s)?,
            other => return Err(SizeError::WrongType(other.type_str())),
        };
        if n == 0 {
            return Err(SizeError::Zero);
        }
        if n % SIZE_ALIGN != 0 {
            return Err(SizeError::Unaligned(n));
        }
        Ok(n)
    };
    checked().map_err(|e| ValueError {
        key: key.to_owned(),
        problem: e.into(),
    })
}

/// Parses a human size: an integer or decimal number, optional spaces, and an
/// optional unit. Binary units: `KiB MiB GiB TiB PiB` and the one-letter
/// `K M G T P` (as qemu-img reads them); decimal units: `kB KB MB GB TB PB`;
/// `B` or no unit is bytes. Units are case-insensitive. The result must be a
/// whole number of bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError::NotASize(s.to_owned());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim_start();

    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return Err(bad()),
    };

    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || (num.contains('.') && frac.is_empty()) {
        return Err(bad());
    }
    let too_large = || SizeError::TooLarge(s.to_owned());
    let int: u64 = int.parse().map_err(|_| too_large())?;
    let mut total = int.checked_mul(mult).ok_or_else(too_large)?;

    // The fraction, exactly: frac_digits * mult / 10^len must be whole.
    let frac = frac.trim_end_matches('0');
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(SizeError::TooManyDecimals(s.to_owned()));
        }
        let digits: u128 = frac.parse().map_err(|_| bad())?;
        let scale = 10u128.pow(frac.len() as u32);
        let scaled = digits * u128::from(mult);
        let whole = scaled / scale;
        if whole * scale != scaled {
            return Err(SizeError::Fractional(s.to_owned()));
        }
        let part = u64::try_from(whole).map_err(|_| too_large())?;
        total = total.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(total)
}
