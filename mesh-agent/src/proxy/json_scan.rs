//! A validating JSON scanner over untrusted bytes, for readers that want a few members of a
//! document and nothing else: it walks the text once, hands object keys and strings out as
//! slices of the input (decoded into a new string only when they contain escapes), checks
//! the grammar of everything it skips, and bounds nesting depth. It builds no tree and
//! allocates nothing for what it skips.
//!
//! It follows RFC 8259: the whole text must be UTF-8, strings may not hold control
//! characters, numbers follow the JSON grammar, and nothing but whitespace may follow the
//! value. Strings handed out must not hold a lone UTF-16 surrogate (`\ud800`); skipped
//! strings only need well-formed escapes.

use std::borrow::Cow;

use thiserror::Error;

/// Why a text was not scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ScanError {
    /// The text is not JSON.
    #[error("{what} at byte {at}")]
    Syntax { what: &'static str, at: usize },
    /// Arrays and objects nest deeper than the scanner's limit.
    #[error("nesting deeper than {max} levels")]
    TooDeep { max: usize },
}

/// A scalar member value as a reader keeps it: strings and integers that fit `i64`, `null`,
/// and `Other` for any other number, a boolean, an array or an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scalar<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Null,
    Other,
}

/// The next value's kind, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    Null,
    /// A string, number or boolean.
    Other,
}

/// A cursor over one JSON text.
#[derive(Debug)]
pub struct Scanner<'a> {
    text: &'a str,
    at: usize,
    depth: usize,
    max_depth: usize,
}

impl<'a> Scanner<'a> {
    /// A scanner over `bytes`, which must be UTF-8, allowing `max_depth` levels of nesting
    /// (the outermost array or object is level 1).
    pub fn new(bytes: &'a [u8], max_depth: usize) -> Result<Self, ScanError> {
        let text = std::str::from_utf8(bytes).map_err(|error| ScanError::Syntax {
            what: "invalid UTF-8",
            at: error.valid_up_to(),
        })?;
        let mut scanner = Self {
            text,
            at: 0,
            depth: 0,
            max_depth,
        };
        scanner.skip_whitespace();
        Ok(scanner)
    }

    /// Checks that nothing but whitespace follows the value just scanned.
    pub fn finish(mut self) -> Result<(), ScanError> {
        self.skip_whitespace();
        if self.at == self.text.len() {
            Ok(())
        } else {
            Err(self.error("trailing characters"))
        }
    }

    /// The kind of the value at the cursor (a syntax error if there is none).
    pub fn peek_kind(&self) -> Result<Kind, ScanError> {
        match self.peek() {
            Some(b'{') => Ok(Kind::Object),
            Some(b'[') => Ok(Kind::Array),
            Some(b'n') => Ok(Kind::Null),
            Some(b'"' | b'-' | b'0'..=b'9' | b't' | b'f') => Ok(Kind::Other),
            Some(_) => Err(self.error("expected a value")),
            None => Err(self.error("end of input where a value was expected")),
        }
    }

    /// Scans an object, calling `member` with each key while the cursor is at that key's
    /// value; `member` must consume the value (with [`Self::skip_value`] if it has no use for
    /// it).
    pub fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, Cow<'a, str>) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.open(b'{')?;
        if self.eat(b'}') {
            return self.close();
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a string key"));
            }
            let key = self.string(true)?;
            self.skip_whitespace();
            if !self.eat(b':') {
                return Err(self.error("expected ':'"));
            }
            self.skip_whitespace();
            member(self, key)?;
            if !self.another(b'}', "expected ',' or '}'")? {
                return self.close();
            }
        }
    }

    /// Scans an array, calling `element` while the cursor is at each element; `element` must
    /// consume it.
    pub fn array(
        &mut self,
        mut element: impl FnMut(&mut Self) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        self.open(b'[')?;
        if self.eat(b']') {
            return self.close();
        }
        loop {
            element(self)?;
            if !self.another(b']', "expected ',' or ']'")? {
                return self.close();
            }
        }
    }

    /// After a member or element: `true` past a `,` (another follows), `false` past the
    /// closing `bracket`, `expected` as the error otherwise.
    fn another(&mut self, bracket: u8, expected: &'static str) -> Result<bool, ScanError> {
        self.skip_whitespace();
        if self.eat(b',') {
            self.skip_whitespace();
            Ok(true)
        } else if self.eat(bracket) {
            Ok(false)
        } else {
            Err(self.error(expected))
        }
    }

    /// Scans any value and keeps it if it is a scalar worth keeping.
    pub fn scalar(&mut self) -> Result<Scalar<'a>, ScanError> {
        match self.peek() {
            Some(b'"') => Ok(Scalar::Str(self.string(true)?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'n') => self.literal("null").map(|()| Scalar::Null),
            _ => self.skip_value().map(|()| Scalar::Other),
        }
    }

    /// Scans any value, checking its grammar, and forgets it.
    pub fn skip_value(&mut self) -> Result<(), ScanError> {
        match self.peek() {
            Some(b'{') => self.object(|scanner, _| scanner.skip_value()),
            Some(b'[') => self.array(Self::skip_value),
            Some(b'"') => self.string(false).map(drop),
            Some(b'-' | b'0'..=b'9') => self.number().map(drop),
            Some(b't') => self.literal("true"),
            Some(b'f') => self.literal("false"),
            Some(b'n') => self.literal("null"),
            Some(_) => Err(self.error("expected a value")),
            None => Err(self.error("end of input where a value was expected")),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn error(&self, what: &'static str) -> ScanError {
        ScanError::Syntax { what, at: self.at }
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Enters an array or object at the cursor.
    fn open(&mut self, bracket: u8) -> Result<(), ScanError> {
        if !self.eat(bracket) {
            return Err(self.error(if bracket == b'{' {
                "expected '{'"
            } else {
                "expected '['"
            }));
        }
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(ScanError::TooDeep {
                max: self.max_depth,
            });
        }
        self.skip_whitespace();
        Ok(())
    }

    fn close(&mut self) -> Result<(), ScanError> {
        self.depth -= 1;
        Ok(())
    }

    fn literal(&mut self, word: &'static str) -> Result<(), ScanError> {
        if self.text.as_bytes()[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.error("invalid literal"))
        }
    }

    /// Scans a number; an integer that fits `i64` is kept. `-0` is not an integer (it is
    /// the float negative zero, as serde_json reads it).
    fn number(&mut self) -> Result<Scalar<'a>, ScanError> {
        let bytes = self.text.as_bytes();
        let negative = self.eat(b'-');
        let mut magnitude: Option<u64> = Some(0);
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                while let Some(digit @ b'0'..=b'9') = bytes.get(self.at).copied() {
                    magnitude = magnitude
                        .and_then(|m| m.checked_mul(10))
                        .and_then(|m| m.checked_add(u64::from(digit - b'0')));
                    self.at += 1;
                }
            }
            _ => return Err(self.error("invalid number")),
        }
        let mut integer = true;
        if self.eat(b'.') {
            integer = false;
            self.digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            integer = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.digits()?;
        }
        let value = match (integer, magnitude) {
            (true, Some(m)) if !negative => i64::try_from(m).ok(),
            (true, Some(m)) if m > 0 => 0i64.checked_sub_unsigned(m),
            _ => None,
        };
        Ok(value.map_or(Scalar::Other, Scalar::Int))
    }

    /// One or more decimal digits.
    fn digits(&mut self) -> Result<(), ScanError> {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
        if self.at == start {
            Err(self.error("invalid number"))
        } else {
            Ok(())
        }
    }

    /// Scans a string at the cursor. `keep`: the caller wants its value, so escapes are
    /// decoded (into a new string) and must not leave a lone surrogate; otherwise they are
    /// only checked for form and the returned value is meaningless.
    fn string(&mut self, keep: bool) -> Result<Cow<'a, str>, ScanError> {
        let bytes = self.text.as_bytes();
        self.at += 1; // the opening quote
        let start = self.at;
        let mut decoded: Option<String> = None;
        // Start of the raw run not yet copied into `decoded`.
        let mut run = start;
        loop {
            self.skip_plain_string_bytes();
            let Some(&byte) = bytes.get(self.at) else {
                return Err(self.error("end of input in a string"));
            };
            match byte {
                b'"' => {
                    let tail = &self.text[run..self.at];
                    self.at += 1;
                    return Ok(match decoded {
                        Some(mut owned) => {
                            owned.push_str(tail);
                            Cow::Owned(owned)
                        }
                        None => Cow::Borrowed(tail),
                    });
                }
                b'\\' => {
                    let raw = &self.text[run..self.at];
                    self.at += 1;
                    let unescaped = self.escape(keep)?;
                    if keep {
                        let owned = decoded.get_or_insert_with(String::new);
                        owned.push_str(raw);
                        owned.push(unescaped);
                    }
                    run = self.at;
                }
                0x00..=0x1f => return Err(self.error("control character in a string")),
                _ => self.at += 1,
            }
        }
    }

    /// Moves over string bytes that need no attention (not a quote, a backslash or a control
    /// character) eight at a time, to the first byte that does; near the end of the input,
    /// stops where fewer than eight bytes are left.
    fn skip_plain_string_bytes(&mut self) {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGHS: u64 = 0x8080_8080_8080_8080;
        // The high bit of each byte of `word` below `limit` (limit at most 0x80). Borrows
        // may flag bytes after the first one that qualifies, never one before it.
        let below =
            |word: u64, limit: u8| word.wrapping_sub(ONES * u64::from(limit)) & !word & HIGHS;
        let equal = |word: u64, byte: u8| below(word ^ (ONES * u64::from(byte)), 1);
        let bytes = self.text.as_bytes();
        while let Some(chunk) = bytes.get(self.at..self.at + 8) {
            let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
                break;
            };
            // Little-endian: the first byte in the text is the lowest of the word.
            let word = u64::from_le_bytes(chunk);
            let flagged = below(word, 0x20) | equal(word, b'"') | equal(word, b'\\');
            if flagged != 0 {
                self.at += (flagged.trailing_zeros() / 8) as usize;
                return;
            }
            self.at += 8;
        }
    }

    /// Scans the escape after a backslash; returns the character it stands for (any
    /// character when not `keep`).
    fn escape(&mut self, keep: bool) -> Result<char, ScanError> {
        let Some(byte) = self.peek() else {
            return Err(self.error("end of input in an escape"));
        };
        self.at += 1;
        Ok(match byte {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4()?;
                if !keep {
                    return Ok(' ');
                }
                match unit {
                    0xD800..=0xDBFF => {
                        if !(self.eat(b'\\') && self.eat(b'u')) {
                            return Err(self.error("lone leading surrogate in an escape"));
                        }
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return Err(self.error("lone leading surrogate in an escape"));
                        }
                        let code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                        char::from_u32(code).ok_or_else(|| self.error("invalid escape"))?
                    }
                    0xDC00..=0xDFFF => {
                        return Err(self.error("lone trailing surrogate in an escape"));
                    }
                    _ => char::from_u32(unit).ok_or_else(|| self.error("invalid escape"))?,
                }
            }
            _ => return Err(self.error("invalid escape")),
        })
    }

    fn hex4(&mut self) -> Result<u32, ScanError> {
        let mut value = 0u32;
        for _ in 0..4 {
            let digit = self
                .peek()
                .and_then(|b| char::from(b).to_digit(16))
                .ok_or_else(|| self.error("invalid \\u escape"))?;
            value = value * 16 + digit;
            self.at += 1;
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_scalar(text: &str) -> Result<Scalar<'_>, ScanError> {
        let mut scanner = Scanner::new(text.as_bytes(), 8)?;
        let value = scanner.scalar()?;
        scanner.finish()?;
        Ok(value)
    }

    #[test]
    fn scalars_are_kept_as_written() {
        assert_eq!(scan_scalar(r#""abc""#), Ok(Scalar::Str("abc".into())));
        assert!(matches!(
            scan_scalar(r#""abc""#),
            Ok(Scalar::Str(Cow::Borrowed(_)))
        ));
        assert_eq!(
            scan_scalar(r#""a\"b\\c\/\n\u00e9\ud83d\ude00""#),
            Ok(Scalar::Str("a\"b\\c/\né😀".into()))
        );
        assert_eq!(scan_scalar(" 42 "), Ok(Scalar::Int(42)));
        assert_eq!(scan_scalar("-7"), Ok(Scalar::Int(-7)));
        assert_eq!(
            scan_scalar("9223372036854775807"),
            Ok(Scalar::Int(i64::MAX))
        );
        assert_eq!(
            scan_scalar("-9223372036854775808"),
            Ok(Scalar::Int(i64::MIN))
        );
        for other in [
            "9223372036854775808",
            "-9223372036854775809",
            "184467440737095516150",
            "-0",
            "1.5",
            "1e3",
            "0E-2",
            "true",
            "false",
            "[1,{}]",
            r#"{"a":[]}"#,
        ] {
            assert_eq!(scan_scalar(other), Ok(Scalar::Other), "{other}");
        }
        assert_eq!(scan_scalar("0"), Ok(Scalar::Int(0)));
        assert_eq!(scan_scalar("null"), Ok(Scalar::Null));
    }

    #[test]
    fn malformed_text_is_a_syntax_error() {
        for bad in [
            "",
            " ",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "+1",
            "tru",
            "nul",
            "[1,]",
            "[1 2]",
            "{\"a\"}",
            "{\"a\":1,}",
            "{a:1}",
            "\"abc",
            "\"a\tb\"",
            r#""\x""#,
            r#""\u12""#,
            r#""\ud800""#,
            r#""\ud800\u0041""#,
            r#""\udc00""#,
            "[]]",
            "\u{feff}[]",
            "1 2",
            "[",
            "{",
        ] {
            assert!(
                matches!(scan_scalar(bad), Err(ScanError::Syntax { .. })),
                "{bad:?}: {:?}",
                scan_scalar(bad)
            );
        }
        assert!(matches!(
            Scanner::new(b"\"\xff\"", 8),
            Err(ScanError::Syntax {
                what: "invalid UTF-8",
                at: 1
            })
        ));
    }

    #[test]
    fn long_strings_end_at_their_first_quote_escape_or_control_character() {
        for at in 0..20 {
            let plain = "é".repeat(at / 2) + &"a".repeat(at % 2);
            assert_eq!(
                scan_scalar(&format!(r#""{plain}abcdefghijklmnop""#)),
                Ok(Scalar::Str(format!("{plain}abcdefghijklmnop").into()))
            );
            assert_eq!(
                scan_scalar(&format!(r#""{plain}\"abcdefghijklmnop""#)),
                Ok(Scalar::Str(format!("{plain}\"abcdefghijklmnop").into()))
            );
            assert!(scan_scalar(&format!("\"{plain}\u{1}abcdefghijklmnop\"")).is_err());
            assert!(scan_scalar(&format!("\"{plain}\u{7f}abcdefghijklmnop\"")).is_ok());
        }
    }

    #[test]
    fn skipped_strings_need_only_well_formed_escapes() {
        let mut scanner = Scanner::new(br#"["\ud800", "\udc00x"]"#, 8).expect("UTF-8");
        assert_eq!(scanner.skip_value(), Ok(()));
        assert_eq!(scanner.finish(), Ok(()));
    }

    #[test]
    fn members_and_elements_are_visited_in_order_and_depth_is_bounded() {
        let text = br#" { "a" : [1, "x", null] , "b\u0063" : {"d": true}, "e": "f" } "#;
        let mut scanner = Scanner::new(text, 8).expect("UTF-8");
        let mut seen = Vec::new();
        scanner
            .object(|scanner, key| {
                if key == "a" {
                    scanner.array(|scanner| {
                        seen.push(format!("{:?}", scanner.scalar()?));
                        Ok(())
                    })
                } else {
                    seen.push(key.into_owned());
                    scanner.skip_value()
                }
            })
            .expect("object");
        assert_eq!(scanner.finish(), Ok(()));
        assert_eq!(
            seen,
            ["Int(1)", "Str(\"x\")", "Null", "bc", "e"].map(String::from)
        );

        let skip = |text: String| Scanner::new(text.as_bytes(), 8)?.skip_value();
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(skip(deep(8)), Ok(()));
        assert_eq!(skip(deep(9)), Err(ScanError::TooDeep { max: 8 }));
        assert_eq!(
            skip("[".repeat(100_000)),
            Err(ScanError::TooDeep { max: 8 })
        );
    }
}
