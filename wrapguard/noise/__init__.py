"""WireGuard's cryptography [W 5]: primitives (crypto), the Noise_IKpsk2 handshake
(handshake), mac1/mac2 and cookies (cookie), transport keypairs with the replay window
(session), and the one enum of drop reasons (reasons). Pure functions and small state
objects; no I/O, no clock, no randomness of their own."""
