//! embedded (todo)
