//! Attempt ids: the id an order carries. An agent refuses an id it already knows (the
//! same order for a job still running excepted), so each attempt of a coordinator job
//! has an id of its own: the job's id (a ULID) for the first, `<job>-a<N>` for the Nth.
//! An agent's logs and partial file names then show which job an attempt belongs to.

/// The id of attempt `attempt` (1 for the first) of the coordinator's job `job`: `job`
/// itself for the first (and for 0), `<job>-a<attempt>` for the others.
///
/// ```
/// use ferry_proto::attempt::{attempt_id, split_attempt_id};
/// let job = "01KAAAAAAAAAAAAAAAAAAAAAAA";
/// assert_eq!(attempt_id(job, 1), job);
/// assert_eq!(attempt_id(job, 3), "01KAAAAAAAAAAAAAAAAAAAAAAA-a3");
/// assert_eq!(split_attempt_id(&attempt_id(job, 3)), Some((job, 3)));
/// ```
pub fn attempt_id(job: &str, attempt: u32) -> String {
    if attempt <= 1 {
        job.to_owned()
    } else {
        format!("{job}-a{attempt}")
    }
}

/// Splits an order's id into the job's id and the attempt: `(id, 1)` for an id without
/// `-a`, `(job, n)` for `<job>-a<n>` with `n` from 2 in decimal without leading zeros;
/// `None` for any other `-a` suffix. The job part is not checked (the agent checks that it
/// is a ULID, which holds no `-`).
pub fn split_attempt_id(id: &str) -> Option<(&str, u32)> {
    let Some((job, n)) = id.rsplit_once("-a") else {
        return Some((id, 1));
    };
    let digits = !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit());
    match n.parse::<u32>() {
        Ok(n) if digits && n >= 2 => Some((job, n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_odd_suffixes_are_refused() {
        let job = "01KAAAAAAAAAAAAAAAAAAAAAAA";
        for n in [1, 2, 10, u32::MAX] {
            assert_eq!(split_attempt_id(&attempt_id(job, n)), Some((job, n)));
        }
        for bad in ["-a", "-a1", "-a0", "-a02", "-a+2", "-a2x", "-a4294967296"] {
            assert_eq!(split_attempt_id(&format!("{job}{bad}")), None, "{bad}");
        }
    }
}
