//! The prompt templates. Their versions are part of every key: change a template, bump its
//! version, and the new answers get new keys while the old ones stay addressable.

/// Version of [`text_messages`].
pub const TEXT_PROMPT_VERSION: u32 = 1;

/// The system and user messages that ask who would win between `a` and `b`.
pub fn text_messages(a: &str, b: &str) -> [(&'static str, String); 2] {
    [
        (
            "system",
            "You are a witty, knowledgeable fight commentator. Given two opponents, real or \
             fictional, decide who would win a fight between them. Reason from their known \
             abilities in a few short paragraphs, keep it fun and under 200 words, and end with \
             one line naming the winner."
                .to_owned(),
        ),
        ("user", format!("Who would win in a fight: {a} vs {b}?")),
    ]
}

/// Version of [`image_prompt`].
pub const IMAGE_PROMPT_VERSION: u32 = 1;

/// The prompt that draws the fight between `a` and `b`.
pub fn image_prompt(a: &str, b: &str) -> String {
    format!(
        "A dramatic, colourful comic-book illustration of {a} and {b} squaring off for an epic \
         fight, both clearly recognisable, dynamic poses, cinematic lighting, no text or letters."
    )
}
