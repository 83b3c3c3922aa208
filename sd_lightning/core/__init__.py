"""The basics every layer may use: the user's errors, the console, the config's resolvers, stop
requests (signals) and writes that never destroy a file."""
