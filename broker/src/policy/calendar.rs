//! Working days, school days and acknowledgement deadlines.
//!
//! The calendar comes from the `calendar` section of the policy set. A working day is Monday to Friday, not a bank
//! holiday. A school day is a working day outside every school closure. Times are UK local time (GMT, or BST from
//! 01:00 UTC on the last Sunday of March to 01:00 UTC on the last Sunday of October), computed here without a time
//! zone database because the rule for the United Kingdom is fixed in law (the Summer Time Order 2002).
//!
//! Deadlines, given the delivery time:
//! - `Within(duration)`: the delivery time plus the duration.
//! - `WorkingDays(n)`: the same local clock time on the n-th working day after the delivery day; a delivery on a
//!   non-working day starts the clock at the start of the next working day.
//! - `SchoolDays(n)`: the same, counting school days and starting at the start of the school day.
//! - `BeforeNextSchoolDay`: the start of the first school day that begins after the delivery.

use std::collections::BTreeSet;

use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset, Weekday};

use super::Deadline;

/// A compiled calendar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    pub school_day_starts_at: Time,
    pub working_day_starts_at: Time,
    pub bank_holidays: BTreeSet<Date>,
    /// Inclusive date ranges on which schools are closed.
    pub school_closures: Vec<(Date, Date)>,
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar {
            school_day_starts_at: Time::from_hms(8, 30, 0).unwrap_or(Time::MIDNIGHT),
            working_day_starts_at: Time::from_hms(9, 0, 0).unwrap_or(Time::MIDNIGHT),
            bank_holidays: BTreeSet::new(),
            school_closures: Vec::new(),
        }
    }
}

/// How far ahead a deadline search looks before giving up (a calendar that closes schools for ever).
const SEARCH_LIMIT_DAYS: u32 = 3660;

impl Calendar {
    pub fn is_working_day(&self, date: Date) -> bool {
        !matches!(date.weekday(), Weekday::Saturday | Weekday::Sunday) && !self.bank_holidays.contains(&date)
    }

    pub fn is_school_day(&self, date: Date) -> bool {
        self.is_working_day(date) && !self.school_closures.iter().any(|(from, until)| *from <= date && date <= *until)
    }

    fn next_day_where(&self, after: Date, wanted: impl Fn(&Calendar, Date) -> bool) -> Option<Date> {
        let mut day = after;
        for _ in 0..SEARCH_LIMIT_DAYS {
            day = day.next_day()?;
            if wanted(self, day) {
                return Some(day);
            }
        }
        None
    }

    /// When an acknowledgement deadline expires for a delivery at `from`.
    pub fn deadline_at(&self, deadline: &Deadline, from: OffsetDateTime) -> OffsetDateTime {
        let fallback = from + Duration::days(i64::from(SEARCH_LIMIT_DAYS));
        match deadline {
            Deadline::Within(duration) => {
                from + Duration::try_from(*duration).unwrap_or(Duration::days(i64::from(SEARCH_LIMIT_DAYS)))
            }
            Deadline::WorkingDays(count) => {
                self.count_days(from, *count, Calendar::is_working_day, self.working_day_starts_at).unwrap_or(fallback)
            }
            Deadline::SchoolDays(count) => {
                self.count_days(from, *count, Calendar::is_school_day, self.school_day_starts_at).unwrap_or(fallback)
            }
            Deadline::BeforeNextSchoolDay => {
                let local = uk_local(from);
                let start_today = PrimitiveDateTime::new(local.date(), self.school_day_starts_at);
                let day = if self.is_school_day(local.date()) && local < start_today {
                    Some(local.date())
                } else {
                    self.next_day_where(local.date(), Calendar::is_school_day)
                };
                day.map(|day| from_uk_local(PrimitiveDateTime::new(day, self.school_day_starts_at))).unwrap_or(fallback)
            }
        }
    }

    fn count_days(
        &self,
        from: OffsetDateTime,
        count: u32,
        wanted: fn(&Calendar, Date) -> bool,
        start_of_day: Time,
    ) -> Option<OffsetDateTime> {
        let local = uk_local(from);
        let (mut day, clock) = if wanted(self, local.date()) {
            (local.date(), local.time())
        } else {
            (self.next_day_where(local.date(), wanted)?, start_of_day)
        };
        for _ in 0..count {
            day = self.next_day_where(day, wanted)?;
        }
        Some(from_uk_local(PrimitiveDateTime::new(day, clock)))
    }
}

/// The UTC instant at which British Summer Time starts or ends in `year` (01:00 UTC on the last Sunday of `month`).
fn last_sunday_one_am_utc(year: i32, month: Month) -> Option<OffsetDateTime> {
    let last_day = time::util::days_in_month(month, year);
    let mut date = Date::from_calendar_date(year, month, last_day).ok()?;
    while date.weekday() != Weekday::Sunday {
        date = date.previous_day()?;
    }
    Some(PrimitiveDateTime::new(date, Time::from_hms(1, 0, 0).ok()?).assume_utc())
}

/// The UK's offset from UTC at the instant `at`.
pub fn uk_offset(at: OffsetDateTime) -> UtcOffset {
    let utc = at.to_offset(UtcOffset::UTC);
    let year = utc.year();
    let summer = match (last_sunday_one_am_utc(year, Month::March), last_sunday_one_am_utc(year, Month::October)) {
        (Some(start), Some(end)) => start <= utc && utc < end,
        _ => false,
    };
    if summer { UtcOffset::from_hms(1, 0, 0).unwrap_or(UtcOffset::UTC) } else { UtcOffset::UTC }
}

/// The UK local date and time of the instant `at`.
pub fn uk_local(at: OffsetDateTime) -> PrimitiveDateTime {
    let local = at.to_offset(uk_offset(at));
    PrimitiveDateTime::new(local.date(), local.time())
}

/// The instant of a UK local date and time (in the hour skipped in spring, the GMT reading is used).
pub fn from_uk_local(local: PrimitiveDateTime) -> OffsetDateTime {
    let summer = UtcOffset::from_hms(1, 0, 0).unwrap_or(UtcOffset::UTC);
    let as_summer = local.assume_offset(summer);
    if uk_offset(as_summer) == summer {
        return as_summer.to_offset(UtcOffset::UTC);
    }
    local.assume_utc()
}

/// Parses a `YYYY-MM-DD` date.
pub fn parse_date(text: &str) -> Option<Date> {
    Date::parse(text, time::macros::format_description!("[year]-[month]-[day]")).ok()
}

/// Parses an `HH:MM` time of day.
pub fn parse_clock(text: &str) -> Option<Time> {
    Time::parse(text, time::macros::format_description!("[hour]:[minute]")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn luton_like() -> Calendar {
        Calendar {
            bank_holidays: [parse_date("2026-04-03"), parse_date("2026-04-06")].into_iter().flatten().collect(),
            school_closures: vec![(
                parse_date("2026-03-30").unwrap_or(Date::MIN),
                parse_date("2026-04-10").unwrap_or(Date::MIN),
            )],
            ..Calendar::default()
        }
    }

    #[test]
    fn summer_time_follows_the_uk_rule() {
        assert_eq!(uk_offset(datetime!(2026-03-29 00:59 UTC)), UtcOffset::UTC);
        assert_eq!(uk_offset(datetime!(2026-03-29 01:00 UTC)).whole_hours(), 1);
        assert_eq!(uk_offset(datetime!(2026-10-25 00:59 UTC)).whole_hours(), 1);
        assert_eq!(uk_offset(datetime!(2026-10-25 01:00 UTC)), UtcOffset::UTC);
    }

    #[test]
    fn before_next_school_day_skips_weekends_and_uses_local_time() {
        let calendar = luton_like();
        // Friday evening in June (BST): next school day is Monday, 08:30 BST = 07:30 UTC.
        let deadline = calendar.deadline_at(&Deadline::BeforeNextSchoolDay, datetime!(2026-06-12 20:00 UTC));
        assert_eq!(deadline, datetime!(2026-06-15 07:30 UTC));
        // Early on a school day, before the start: that same morning.
        let deadline = calendar.deadline_at(&Deadline::BeforeNextSchoolDay, datetime!(2026-06-16 05:00 UTC));
        assert_eq!(deadline, datetime!(2026-06-16 07:30 UTC));
        // During the Easter closure: the first day after it.
        let deadline = calendar.deadline_at(&Deadline::BeforeNextSchoolDay, datetime!(2026-03-27 21:00 UTC));
        assert_eq!(deadline, datetime!(2026-04-13 07:30 UTC));
    }

    #[test]
    fn working_days_skip_weekends_and_bank_holidays() {
        let calendar = luton_like();
        // Thursday 2 April 2026 15:00 BST + 1 working day: Friday 3rd and Monday 6th are bank holidays.
        let deadline = calendar.deadline_at(&Deadline::WorkingDays(1), datetime!(2026-04-02 14:00 UTC));
        assert_eq!(deadline, datetime!(2026-04-07 14:00 UTC));
        // Saturday: the clock starts Monday 09:00 GMT, one working day later is Tuesday 09:00.
        let deadline = calendar.deadline_at(&Deadline::WorkingDays(1), datetime!(2026-01-10 10:00 UTC));
        assert_eq!(deadline, datetime!(2026-01-13 09:00 UTC));
    }

    #[test]
    fn school_days_skip_closures() {
        let calendar = luton_like();
        // Friday 10:00 GMT, the last school day before Easter: the same local clock time (now BST) on 13 April.
        let deadline = calendar.deadline_at(&Deadline::SchoolDays(1), datetime!(2026-03-27 10:00 UTC));
        assert_eq!(deadline, datetime!(2026-04-13 09:00 UTC));
    }

    #[test]
    fn within_adds_the_duration() {
        let calendar = Calendar::default();
        let deadline = calendar
            .deadline_at(&Deadline::Within(std::time::Duration::from_secs(4 * 3600)), datetime!(2026-01-10 22:00 UTC));
        assert_eq!(deadline, datetime!(2026-01-11 02:00 UTC));
    }
}
