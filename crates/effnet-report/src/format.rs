//! How numbers are written in the Markdown and HTML reports (the same functions for both, so
//! the two show the same figures as `report.json` holds).

/// `0.8907` → `89.07%`.
pub fn percent(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

/// The paper's precision: `0.771` → `77.1%`.
pub fn percent1(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

/// `5.3e6` → `5.3M`, `557e6` → `557M`, `4_019_782` → `4.02M`.
pub fn count(value: f64) -> String {
    let (scaled, unit) = if value >= 1e9 {
        (value / 1e9, "B")
    } else if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = if scaled >= 100.0 {
        format!("{scaled:.0}")
    } else if scaled >= 10.0 {
        format!("{scaled:.1}")
    } else {
        format!("{scaled:.2}")
    };
    let text =
        if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.').to_string() } else { text };
    format!("{text}{unit}")
}

/// A ratio: `4.9×`.
pub fn ratio(value: f64) -> String {
    if value >= 10.0 { format!("{value:.0}×") } else { format!("{value:.2}×") }
}

/// Bytes in MB (10^6).
pub fn megabytes(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// `3725.2` → `1 h 02 min 05 s`; under a minute with one decimal.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "–".into();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let total = seconds.round() as u64;
    let (h, m, s) = (total / 3600, total % 3600 / 60, total % 60);
    if h > 0 { format!("{h} h {m:02} min {s:02} s") } else { format!("{m} min {s:02} s") }
}

/// Epochs: whole numbers plainly, fractions with two decimals.
pub fn epochs(value: f64) -> String {
    if (value - value.round()).abs() < 1e-9 { format!("{value:.0}") } else { format!("{value:.2}") }
}

/// A plain number with `decimals` digits after the point.
pub fn fixed(value: f64, decimals: usize) -> String {
    format!("{value:.decimals$}")
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Seconds since the Unix epoch as `2026-11-28T23:16:39Z`.
pub fn utc_iso(unix: f64) -> String {
    let secs = unix.max(0.0).floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(percent(0.890_71), "89.07%");
        assert_eq!(percent1(0.771), "77.1%");
        assert_eq!(count(5.3e6), "5.3M");
        assert_eq!(count(557e6), "557M");
        assert_eq!(count(4_019_782.0), "4.02M");
        assert_eq!(count(0.39e9), "390M");
        assert_eq!(count(37e9), "37B");
        assert_eq!(count(8_327_392.0), "8.33M");
        assert_eq!(ratio(4.905), "4.91×");
        assert_eq!(ratio(10.51), "11×");
        assert_eq!(duration(12.34), "12.3 s");
        assert_eq!(duration(3725.2), "1 h 02 min 05 s");
        assert_eq!(duration(65.0), "1 min 05 s");
        assert_eq!(epochs(2.0), "2");
        assert_eq!(epochs(0.064), "0.06");
        assert_eq!(megabytes(65_085_971.0), "65.1 MB");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_iso(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_iso(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(utc_iso(1_795_908_091.4), "2026-11-28T23:21:31Z");
    }
}
