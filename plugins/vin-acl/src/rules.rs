//! Topic rules with `${vin}` templates: a template fills a whole topic level with the client's VIN, as a literal.
//! Publishes are checked by topic matching, subscriptions by filter containment: a filter is allowed only if
//! every topic it can match is allowed.

/// What a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Publish,
    Subscribe,
}

/// One level of a rule's filter.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(String),
    Vin,
    SingleWildcard,
    MultiWildcard,
}

/// A topic filter in which `${vin}` stands for the client's VIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    levels: Vec<Level>,
}

impl Template {
    /// `${vin}` must be a whole level; `#` only last; no empty filter.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("an empty topic filter".to_owned());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let level = match *part {
                // `${id}` reads better in the rules of a non-VIN namespace; both bind the principal's identity.
                "${vin}" | "${id}" => Level::Vin,
                "+" => Level::SingleWildcard,
                "#" if index + 1 == parts.len() => Level::MultiWildcard,
                "#" => return Err(format!("{text:?}: '#' must be the last level")),
                literal if literal.contains("${") => {
                    return Err(format!(
                        "{text:?}: a template must fill a whole level (\"${{vin}}\" or \"${{id}}\" alone)"
                    ));
                }
                literal if literal.contains(['+', '#', '\0']) => {
                    return Err(format!("{text:?}: wildcards must fill a whole level"));
                }
                literal => Level::Literal(literal.to_owned()),
            };
            levels.push(level);
        }
        Ok(Template { levels })
    }

    pub fn uses_vin(&self) -> bool {
        self.levels.contains(&Level::Vin)
    }

    /// The level at `index` for this VIN: `None` past the end.
    fn level<'a>(&'a self, index: usize, vin: Option<&'a str>) -> Option<Bound<'a>> {
        Some(match self.levels.get(index)? {
            Level::Literal(text) => Bound::Literal(text),
            // Without a VIN (a role), `${vin}` stands for any single level.
            Level::Vin => vin.map_or(Bound::Single, Bound::Literal),
            Level::SingleWildcard => Bound::Single,
            Level::MultiWildcard => Bound::Multi,
        })
    }

    /// Whether the rule, bound to `vin`, matches the topic name.
    pub fn matches_topic(&self, topic: &str, vin: Option<&str>) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        for (index, level) in levels.iter().enumerate() {
            match self.level(index, vin) {
                None => return false,
                Some(Bound::Multi) => return !(index == 0 && topic.starts_with('$')),
                Some(Bound::Single) => {
                    if index == 0 && topic.starts_with('$') {
                        return false;
                    }
                }
                Some(Bound::Literal(text)) => {
                    if text != *level {
                        return false;
                    }
                }
            }
        }
        // "a/#" also matches "a".
        match self.level(levels.len(), vin) {
            None => true,
            Some(Bound::Multi) => self.levels.len() == levels.len() + 1,
            Some(_) => false,
        }
    }

    /// Whether every topic the requested filter can match is matched by the rule bound to `vin`.
    pub fn contains_filter(&self, filter: &str, vin: Option<&str>) -> bool {
        let requested: Vec<&str> = filter.split('/').collect();
        for (index, level) in requested.iter().enumerate() {
            let Some(bound) = self.level(index, vin) else { return false };
            match (bound, *level) {
                (Bound::Multi, _) => return !(index == 0 && filter.starts_with('$') && !self.is_literal_at(0)),
                (_, "#") => return false,
                (Bound::Single, _) => {}
                (Bound::Literal(_), "+") => return false,
                (Bound::Literal(text), literal) => {
                    if text != literal {
                        return false;
                    }
                }
            }
        }
        match self.level(requested.len(), vin) {
            None => true,
            // The requested filter stops where the rule still has "#": "a/#" contains "a".
            Some(Bound::Multi) => self.levels.len() == requested.len() + 1,
            Some(_) => false,
        }
    }

    fn is_literal_at(&self, index: usize) -> bool {
        matches!(self.levels.get(index), Some(Level::Literal(_)))
    }
}

#[derive(Clone, Copy)]
enum Bound<'a> {
    Literal(&'a str),
    Single,
    Multi,
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIN: &str = "1J9RP1A36A1644345";

    fn template(text: &str) -> Template {
        Template::parse(text).expect("valid template")
    }

    #[test]
    fn templates_fill_whole_levels_only() {
        assert!(Template::parse("vehicle/${vin}/#").is_ok());
        assert!(Template::parse("vehicle/car-${vin}/#").is_err());
        assert!(Template::parse("vehicle/#/x").is_err());
        assert!(Template::parse("vehicle/a+b").is_err());
        assert!(Template::parse("").is_err());
    }

    #[test]
    fn publish_matches_the_own_vin_only() {
        let rule = template("vehicle/${vin}/telemetry/#");
        assert!(rule.matches_topic(&format!("vehicle/{VIN}/telemetry/speed"), Some(VIN)));
        assert!(rule.matches_topic(&format!("vehicle/{VIN}/telemetry"), Some(VIN)));
        assert!(!rule.matches_topic("vehicle/1G1BN53E6NW128495/telemetry/speed", Some(VIN)));
        assert!(!rule.matches_topic(&format!("vehicle/{VIN}/commands"), Some(VIN)));
        assert!(!rule.matches_topic(&format!("vehicle/{VIN}"), Some(VIN)));
    }

    #[test]
    fn subscriptions_are_checked_by_containment() {
        let rule = template("vehicle/${vin}/#");
        assert!(rule.contains_filter(&format!("vehicle/{VIN}/#"), Some(VIN)));
        assert!(rule.contains_filter(&format!("vehicle/{VIN}/updates/+"), Some(VIN)));
        assert!(rule.contains_filter(&format!("vehicle/{VIN}"), Some(VIN)));
        // A wildcard where the VIN stands would reach other cars.
        assert!(!rule.contains_filter("vehicle/+/state", Some(VIN)));
        assert!(!rule.contains_filter("vehicle/#", Some(VIN)));
        assert!(!rule.contains_filter("#", Some(VIN)));
        assert!(!rule.contains_filter("+/+/state", Some(VIN)));
        let exact = template("vehicle/${vin}/state");
        assert!(exact.contains_filter(&format!("vehicle/{VIN}/state"), Some(VIN)));
        assert!(!exact.contains_filter(&format!("vehicle/{VIN}/+"), Some(VIN)));
        assert!(!exact.contains_filter(&format!("vehicle/{VIN}/state/#"), Some(VIN)));
    }

    #[test]
    fn a_role_without_a_vin_gets_any_vin_level() {
        let rule = template("vehicle/${vin}/status");
        assert!(rule.contains_filter("vehicle/+/status", None));
        assert!(rule.matches_topic(&format!("vehicle/{VIN}/status"), None));
        assert!(!rule.contains_filter("vehicle/#", None));
    }

    #[test]
    fn dollar_topics_need_an_explicit_rule() {
        assert!(!template("#").contains_filter("$SYS/#", None));
        assert!(!template("#").matches_topic("$SYS/broker/uptime", None));
        assert!(!template("+/broker/uptime").matches_topic("$SYS/broker/uptime", None));
        assert!(template("$SYS/#").contains_filter("$SYS/broker/#", None));
    }
}
