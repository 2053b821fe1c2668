//! VIN syntax (ISO 3779 / 49 CFR 565): 17 characters of `[A-HJ-NPR-Z0-9]`, the North-American check digit at
//! position 9, and the model-year character at position 10.

/// How strictly the check digit is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckDigitMode {
    /// Every VIN must carry a correct check digit.
    Strict,
    /// Enforced when the first WMI character is in the configured set (North America and China by default);
    /// a mismatch elsewhere is a warning, since ISO 3779 does not require the digit.
    Regional,
    /// Never refused, mismatches reported.
    Warn,
    Off,
}

impl CheckDigitMode {
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "strict" => Ok(Self::Strict),
            "regional" => Ok(Self::Regional),
            "warn" => Ok(Self::Warn),
            "off" => Ok(Self::Off),
            other => Err(format!("check_digit {other:?}: expected strict, regional, warn or off")),
        }
    }
}

/// Why a string is not an acceptable VIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VinError {
    Length(usize),
    Character(char),
    CheckDigit { expected: char, found: char },
    ModelYear(char),
}

impl std::fmt::Display for VinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VinError::Length(length) => write!(f, "length {length}, a VIN has 17 characters"),
            VinError::Character(c) => write!(f, "character {c:?} is not in [A-HJ-NPR-Z0-9]"),
            VinError::CheckDigit { expected, found } => write!(f, "check digit {found:?}, expected {expected:?}"),
            VinError::ModelYear(c) => write!(f, "model-year character {c:?} is never used"),
        }
    }
}

/// What validation found besides a hard failure: problems that were only warned about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Warnings(pub Vec<VinError>);

fn transliterate(c: char) -> Option<u32> {
    Some(match c {
        '0'..='9' => c.to_digit(10)?,
        'A' | 'J' => 1,
        'B' | 'K' | 'S' => 2,
        'C' | 'L' | 'T' => 3,
        'D' | 'M' | 'U' => 4,
        'E' | 'N' | 'V' => 5,
        'F' | 'W' => 6,
        'G' | 'P' | 'X' => 7,
        'H' | 'Y' => 8,
        'R' | 'Z' => 9,
        _ => return None,
    })
}

const WEIGHTS: [u32; 17] = [8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2];

/// The check digit a syntactically valid VIN should carry.
pub fn expected_check_digit(vin: &str) -> Option<char> {
    let mut sum = 0;
    for (c, weight) in vin.chars().zip(WEIGHTS) {
        sum += transliterate(c)? * weight;
    }
    Some(match sum % 11 {
        10 => 'X',
        digit => char::from_digit(digit, 10)?,
    })
}

/// Validation settings.
#[derive(Clone, Debug)]
pub struct VinPolicy {
    pub check_digit: CheckDigitMode,
    /// First WMI characters whose VINs must carry a correct digit in `Regional` mode.
    pub check_digit_wmi: Vec<char>,
    /// Refuse (true) or only warn (false) about an impossible model-year character on check-digit-bearing VINs.
    pub model_year_strict: bool,
    pub model_year_check: bool,
}

impl Default for VinPolicy {
    fn default() -> Self {
        Self {
            check_digit: CheckDigitMode::Regional,
            check_digit_wmi: vec!['1', '2', '3', '4', '5', 'L'],
            model_year_strict: false,
            model_year_check: true,
        }
    }
}

impl VinPolicy {
    /// `Ok` with any warnings, or the reason the VIN is refused. No case folding: a lower-case VIN is refused.
    pub fn validate(&self, vin: &str) -> Result<Warnings, VinError> {
        let length = vin.chars().count();
        if length != 17 {
            return Err(VinError::Length(length));
        }
        if let Some(bad) = vin.chars().find(|c| !matches!(c, '0'..='9' | 'A'..='H' | 'J'..='N' | 'P' | 'R'..='Z')) {
            return Err(VinError::Character(bad));
        }
        let mut warnings = Warnings::default();
        let regional = vin.chars().next().is_some_and(|first| self.check_digit_wmi.contains(&first));
        let found = vin.chars().nth(8).unwrap_or('?');
        let expected = expected_check_digit(vin).unwrap_or('?');
        if found != expected {
            let error = VinError::CheckDigit { expected, found };
            match self.check_digit {
                CheckDigitMode::Strict => return Err(error),
                CheckDigitMode::Regional if regional => return Err(error),
                CheckDigitMode::Regional | CheckDigitMode::Warn => warnings.0.push(error),
                CheckDigitMode::Off => {}
            }
        }
        // Position 10 never uses I, O, Q (already excluded), U, Z or 0; mandatory only where the digit is.
        let year = vin.chars().nth(9).unwrap_or('?');
        if self.model_year_check && regional && matches!(year, 'U' | 'Z' | '0') {
            let error = VinError::ModelYear(year);
            if self.model_year_strict {
                return Err(error);
            }
            warnings.0.push(error);
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regulation_vectors() {
        for (vin, digit) in [
            ("1J9RP1A36A1644345", '6'),
            ("1G1BN53E6NW128495", '6'),
            ("1M8GDM9AXKP042788", 'X'),
            ("11111111111111111", '1'),
            ("1G4AH59H05G118341", '4'),
        ] {
            assert_eq!(expected_check_digit(vin), Some(digit), "{vin}");
        }
        let policy = VinPolicy::default();
        assert_eq!(policy.validate("1J9RP1A36A1644345"), Ok(Warnings::default()));
        assert_eq!(policy.validate("1G4AH59H05G118341"), Err(VinError::CheckDigit { expected: '4', found: '0' }));
    }

    #[test]
    fn a_one_character_change_breaks_the_check_digit() {
        let policy = VinPolicy::default();
        // Position 17 changed: 5 -> 6.
        assert!(matches!(policy.validate("1J9RP1A36A1644346"), Err(VinError::CheckDigit { .. })));
    }

    #[test]
    fn regional_mode_enforces_north_america_and_china_only() {
        let policy = VinPolicy::default();
        // A German and a Japanese VIN whose position 9 is not the NA digit: warned, not refused.
        let german = "WVWZZZ1JZXW000001";
        assert!(expected_check_digit(german) != german.chars().nth(8));
        assert!(matches!(policy.validate(german), Ok(Warnings(w)) if w.len() == 1));
        let japanese = "JHMCM56557C404453";
        assert!(policy.validate(japanese).is_ok());
        // A Chinese VIN must carry a correct digit.
        let mut chinese: Vec<char> = "LSVAU2180N2183294".chars().collect();
        let good = expected_check_digit(&chinese.iter().collect::<String>()).expect("digit");
        chinese[8] = good;
        let valid: String = chinese.iter().collect();
        assert_eq!(policy.validate(&valid), Ok(Warnings::default()));
        chinese[8] = if good == '0' { '1' } else { '0' };
        let broken: String = chinese.iter().collect();
        assert!(matches!(policy.validate(&broken), Err(VinError::CheckDigit { .. })));
        // Strict mode refuses the German one too; off accepts anything well-formed.
        let strict = VinPolicy { check_digit: CheckDigitMode::Strict, ..VinPolicy::default() };
        assert!(strict.validate(german).is_err());
        let off = VinPolicy { check_digit: CheckDigitMode::Off, ..VinPolicy::default() };
        assert_eq!(off.validate(german), Ok(Warnings::default()));
    }

    #[test]
    fn syntax_is_strict() {
        let policy = VinPolicy::default();
        for (input, error) in [
            ("1J9RP1A36A164434", VinError::Length(16)),
            ("1J9RP1A36A16443455", VinError::Length(18)),
            ("1j9RP1A36A1644345", VinError::Character('j')),
            ("1J9RP1A36A164434+", VinError::Character('+')),
            ("1J9RP1A36A164434#", VinError::Character('#')),
            ("1J9RP1A36A164434/", VinError::Character('/')),
            ("1J9RP1A36A164434\0", VinError::Character('\0')),
            ("1J9RP1A36A16443I5", VinError::Character('I')),
            ("1J9RP1A36A16443O5", VinError::Character('O')),
            ("1J9RP1A36A16443Q5", VinError::Character('Q')),
            ("", VinError::Length(0)),
        ] {
            assert_eq!(policy.validate(input), Err(error), "{input:?}");
        }
    }

    #[test]
    fn impossible_model_year_is_warned() {
        let policy = VinPolicy { check_digit: CheckDigitMode::Off, ..VinPolicy::default() };
        let vin = "1J9RP1A36U1644345";
        assert_eq!(policy.validate(vin), Ok(Warnings(vec![VinError::ModelYear('U')])));
        let strict = VinPolicy { model_year_strict: true, ..policy };
        assert_eq!(strict.validate(vin), Err(VinError::ModelYear('U')));
    }
}
