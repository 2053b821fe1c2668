//! Topic names, topic filters and matching (MQTT section 4.7), plus shared-subscription syntax (4.8.2).

#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty [MQTT-4.7.3-1]")]
    Empty,
    #[error("topic is longer than 65535 bytes")]
    TooLong,
    #[error("topic name contains a wildcard [MQTT-4.7.0-1]")]
    WildcardInName,
    #[error("'#' must be alone in the last level [MQTT-4.7.1-1]")]
    MisplacedMultiLevelWildcard,
    #[error("'+' must occupy a whole level [MQTT-4.7.1-2]")]
    MisplacedSingleLevelWildcard,
    #[error("invalid shared subscription: needs $share/<group>/<filter> with a non-empty group without wildcards")]
    InvalidSharedSubscription,
    #[error("topic contains U+0000")]
    NullCharacter,
}

pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    if topic.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong);
    }
    if filter.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevelWildcard);
        }
    }
    Ok(())
}

/// A filter after removing any `$share/<group>/` prefix.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

/// Validates a subscription filter, splitting off a shared-subscription group.
pub fn parse_subscription_filter(filter: &str) -> Result<ParsedFilter<'_>, TopicError> {
    if let Some(rest) = filter.strip_prefix("$share/") {
        let Some((group, inner)) = rest.split_once('/') else {
            return Err(TopicError::InvalidSharedSubscription);
        };
        if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
            return Err(TopicError::InvalidSharedSubscription);
        }
        validate_topic_filter(inner)?;
        return Ok(ParsedFilter { share_group: Some(group), filter: inner });
    }
    if filter == "$share" {
        return Err(TopicError::InvalidSharedSubscription);
    }
    validate_topic_filter(filter)?;
    Ok(ParsedFilter { share_group: None, filter })
}

/// Whether `filter` matches `topic`. A filter starting with a wildcard does not match topics that start with
/// `$` [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(expected), Some(actual)) if expected == actual => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/broker", "$SYS/broker"));
        assert!(matches("$SYS/#", "$SYS/broker"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn filters_are_validated() {
        assert!(validate_topic_filter("a/#").is_ok());
        assert!(validate_topic_filter("+/+/#").is_ok());
        assert_eq!(validate_topic_filter("a/#/b"), Err(TopicError::MisplacedMultiLevelWildcard));
        assert_eq!(validate_topic_filter("a#"), Err(TopicError::MisplacedMultiLevelWildcard));
        assert_eq!(validate_topic_filter("a+/b"), Err(TopicError::MisplacedSingleLevelWildcard));
        assert_eq!(validate_topic_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInName));
    }

    #[test]
    fn shared_subscriptions_are_parsed() {
        let parsed = parse_subscription_filter("$share/group/a/+");
        assert_eq!(parsed, Ok(ParsedFilter { share_group: Some("group"), filter: "a/+" }));
        assert!(parse_subscription_filter("$share/group").is_err());
        assert!(parse_subscription_filter("$share//a").is_err());
        assert!(parse_subscription_filter("$share/g+/a").is_err());
        assert_eq!(parse_subscription_filter("a/b").map(|p| p.share_group), Ok(None));
    }
}
