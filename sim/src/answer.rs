//! Deterministic fight-commentary answers: the same seed always yields the same tokens.
//!
//! The phrase lists deliberately carry multi-byte UTF-8 ("naïve", "—", "🥊", "Ünal")
//! so that clients slicing by bytes get caught out.

const OPENERS: &[&str] = &[
    "",
    "",
    "Early on,",
    "By round three,",
    "Déjà vu:",
    "Out of nowhere",
    "Honestly,",
    "At the bell,",
    "Mid-fight —",
    "On the scorecards,",
];
const FIGHTERS: &[&str] = &[
    "the challenger",
    "the champion",
    "the underdog",
    "Ünal's pick",
    "the favourite",
    "the southpaw",
    "the bruiser",
    "the crowd favourite",
];
const MOVES: &[&str] = &[
    "lands",
    "slips",
    "eats",
    "counters with",
    "feints into",
    "absorbs",
    "throws",
    "answers with",
    "walks through",
];
const BLOWS: &[&str] = &[
    "a naïve jab",
    "a looping hook",
    "a crisp uppercut 🥊",
    "the body shot",
    "a spinning kick",
    "a wild haymaker",
    "a flurry of elbows",
    "a sneaky clinch",
    "pure cardio",
];
const TAILS: &[&str] = &[
    "",
    "against the ropes",
    "— and the crowd roars",
    "like a coup de grâce",
    "without blinking",
    "in the pocket",
    "behind a calm façade",
    "to thunderous boos",
];
const ENDS: &[&str] = &[".", ".", "!", "…", "?"];

/// An answer held as one string plus the byte offset where each token ends,
/// so a stream can slice tokens out without allocating per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    text: String,
    ends: Vec<u32>,
}

impl Answer {
    /// `tokens` words of commentary, each after the first with a leading space.
    pub fn generate(seed: &[u8; 32], tokens: usize) -> Self {
        let mut rng = SplitMix::from_seed(seed);
        let mut answer = Answer {
            text: String::with_capacity(tokens * 8),
            ends: Vec::with_capacity(tokens),
        };
        let mut sentence: Vec<&'static str> = Vec::with_capacity(16);
        while answer.ends.len() < tokens {
            sentence.clear();
            for list in [OPENERS, FIGHTERS, MOVES, BLOWS, TAILS] {
                sentence.extend(rng.pick(list).split_whitespace());
            }
            let end = rng.pick(ENDS);
            let last = sentence.len() - 1;
            for (i, word) in sentence.iter().enumerate() {
                if answer.ends.len() == tokens {
                    break;
                }
                answer.push_word(word, i == 0, if i == last { end } else { "" });
            }
        }
        // A cut-short last sentence still ends like a sentence.
        if !answer.text.is_empty() && !answer.text.ends_with(['.', '!', '?', '…']) {
            answer.text.push('.');
            if let Some(last) = answer.ends.last_mut() {
                *last = answer.text.len() as u32;
            }
        }
        answer
    }

    fn push_word(&mut self, word: &str, capitalise: bool, suffix: &str) {
        if !self.ends.is_empty() {
            self.text.push(' ');
        }
        let start = self.text.len();
        self.text.push_str(word);
        // `get_mut` refuses to split a multi-byte first letter, which is then left alone.
        if let Some(first) = self.text.get_mut(start..start + 1).filter(|_| capitalise) {
            first.make_ascii_uppercase();
        }
        self.text.push_str(suffix);
        self.ends.push(self.text.len() as u32);
    }

    /// Adds `text` at the end, word by word, each word after a space. As a model's tokenizer
    /// does, a word is cut before each `.` and `/` (`evil` `.example` `/x`), so that a link
    /// arrives in pieces, in separate chunks when the stream is paced.
    pub fn say(&mut self, text: &str) {
        for word in text.split_whitespace() {
            let mut piece_start = 0;
            let cuts = word
                .char_indices()
                .filter(|&(i, c)| i > 0 && (c == '.' || c == '/'))
                .map(|(i, _)| i)
                .chain(std::iter::once(word.len()));
            for (n, cut) in cuts.enumerate() {
                let piece = &word[piece_start..cut];
                piece_start = cut;
                if piece.is_empty() {
                    continue;
                }
                if n == 0 && !self.ends.is_empty() {
                    self.text.push(' ');
                }
                self.text.push_str(piece);
                self.ends.push(self.text.len() as u32);
            }
        }
    }

    #[cfg(test)]
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text of the first `tokens` tokens (all of it when there are fewer).
    pub fn text_to(&self, tokens: usize) -> &str {
        match tokens.min(self.ends.len()) {
            0 => "",
            n => &self.text[..self.ends[n - 1] as usize],
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Token `i`, with its leading space.
    pub fn token(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }
}

/// A tiny PRNG (SplitMix64): deterministic, no dependency, good enough for word picks.
struct SplitMix(u64);

impl SplitMix {
    fn from_seed(seed: &[u8; 32]) -> Self {
        let mut first = [0u8; 8];
        first.copy_from_slice(&seed[..8]);
        SplitMix(u64::from_le_bytes(first))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick(&mut self, list: &'static [&'static str]) -> &'static str {
        list[(self.next() % list.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_concatenate_to_the_text_with_single_leading_spaces() {
        let answer = Answer::generate(&[7; 32], 120);
        assert_eq!(answer.len(), 120);
        let joined: String = (0..answer.len()).map(|i| answer.token(i)).collect();
        assert_eq!(joined, answer.text());
        assert!(!answer.token(0).starts_with(' '));
        assert!((1..answer.len()).all(|i| answer.token(i).starts_with(' ')));
    }

    #[test]
    fn a_full_answer_carries_multi_byte_characters() {
        let answer = Answer::generate(&[1; 32], 120);
        assert!(answer.text().len() > answer.text().chars().count());
    }

    #[test]
    fn the_same_seed_gives_the_same_words_and_another_seed_differs() {
        assert_eq!(
            Answer::generate(&[3; 32], 50),
            Answer::generate(&[3; 32], 50)
        );
        assert_ne!(
            Answer::generate(&[3; 32], 50),
            Answer::generate(&[4; 32], 50)
        );
    }

    #[test]
    fn said_words_end_the_answer_and_a_link_comes_in_pieces() {
        let mut answer = Answer::generate(&[5; 32], 3);
        let before = answer.text().to_owned();
        answer.say("Visit https://evil.example/x now.");
        assert_eq!(
            answer.text(),
            format!("{before} Visit https://evil.example/x now.")
        );
        let tokens: Vec<&str> = (3..answer.len()).map(|i| answer.token(i)).collect();
        assert_eq!(
            tokens,
            [
                " Visit", " https:", "/", "/evil", ".example", "/x", " now", "."
            ]
        );
        let mut empty = Answer::generate(&[0; 32], 0);
        empty.say("evil.example");
        assert_eq!(empty.text(), "evil.example");
        assert_eq!(empty.token(0), "evil");
    }

    #[test]
    fn zero_tokens_is_an_empty_answer() {
        assert_eq!(Answer::generate(&[0; 32], 0).len(), 0);
    }
}
