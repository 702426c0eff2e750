"""The peer link: everything one node says to, and concludes about, its peer.

``wire``      sans-I/O framing and authentication of sync-link messages (bytes in, events out)
``link``      PeerLink: the one TCP connection to the peer, hello, heartbeats, reconnects (trio)
``detector``  FailureDetector: is the peer dead? a pure state machine, and its trio driver
"""
