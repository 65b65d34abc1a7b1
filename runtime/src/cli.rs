pub fn main_cli() {}
