//! `tollgate plugin test`: replays recorded hook events (JSON Lines) against one plugin, without a broker.
