//! What the restore of a backup set came to, from the ends of its jobs: restored whole,
//! partly or not at all, and in words. The coordinator records it (audit log, job events);
//! `ferry restore --wait` prints the same from the jobs it watched.

/// What the restore of a set came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// Every datastore restored.
    Whole,
    /// Some restored, some not.
    Partly,
    /// None restored.
    None,
}

impl SetOutcome {
    /// `restored whole`, `restored partly` or `not restored`.
    pub fn as_str(self) -> &'static str {
        match self {
            SetOutcome::Whole => "restored whole",
            SetOutcome::Partly => "restored partly",
            SetOutcome::None => "not restored",
        }
    }
}

/// What the restore of a set came to from its ended jobs, given as `(datastore, whether
/// it succeeded, its error)`, and in words: `restored: mongo, files; not restored:
/// postgres (why)` (each error cut to 300 characters).
pub fn set_outcome<'a>(
    jobs: impl IntoIterator<Item = (&'a str, bool, &'a str)>,
) -> (SetOutcome, String) {
    let mut restored: Vec<&str> = Vec::new();
    let mut not: Vec<String> = Vec::new();
    for (datastore, succeeded, error) in jobs {
        if succeeded {
            restored.push(datastore);
        } else {
            let why: String = error.chars().take(300).collect();
            not.push(format!("{datastore} ({why})"));
        }
    }
    let outcome = match (restored.is_empty(), not.is_empty()) {
        (_, true) => SetOutcome::Whole,
        (false, false) => SetOutcome::Partly,
        (true, false) => SetOutcome::None,
    };
    let mut details = format!(
        "restored: {}",
        if restored.is_empty() {
            "none".to_owned()
        } else {
            restored.join(", ")
        }
    );
    if !not.is_empty() {
        details.push_str(&format!("; not restored: {}", not.join("; ")));
    }
    (outcome, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_restored_partly_names_what_was_restored_and_what_was_not_and_why() {
        let (o, d) = set_outcome([
            ("postgres", false, "manifest x.json does not parse"),
            ("files", true, ""),
            ("mongo", true, ""),
        ]);
        assert_eq!(o, SetOutcome::Partly);
        assert_eq!(
            d,
            "restored: files, mongo; not restored: postgres (manifest x.json does not parse)"
        );
        assert_eq!(set_outcome([("a", true, "")]).0, SetOutcome::Whole);
        let (o, d) = set_outcome([("a", false, "gone")]);
        assert_eq!(
            (o, d.as_str()),
            (SetOutcome::None, "restored: none; not restored: a (gone)")
        );
    }
}
