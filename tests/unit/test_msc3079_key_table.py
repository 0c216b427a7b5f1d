"""The whole MSC3079 integer key table (v1) pinned against the MSC's appendix, pair by pair.

Round-trip properties cannot see two swapped entries (72 and 73 swapped still
round-trip, and a client then reads ``access_token`` under the wrong key): every
key -> name pair is listed here as the MSC's appendix prints it.
"""

from __future__ import annotations

import cbor2
import pytest

from comatrix.codec.msc3079 import KEY_TABLE_V1, KEY_TABLE_V1_REVERSE, KEY_TABLES
from comatrix.msc3079.translate import json_from_request, keys_for_client

#: MSC3079 Appendix A (CBOR integer keys, cbor_enum_version 1), transcribed line by line.
APPENDIX_A = """
1 event_id
2 type
3 content
4 state_key
5 room_id
6 sender
7 user_id
8 origin_server_ts
9 unsigned
10 prev_content
11 state
12 timeline
13 events
14 limited
15 prev_batch
16 transaction_id
17 age
18 redacted_because
19 next_batch
20 presence
21 avatar_url
22 account_data
23 rooms
24 join
25 membership
26 displayname
27 body
28 msgtype
29 format
30 formatted_body
31 ephemeral
32 invite_state
33 leave
34 third_party_invite
35 is_direct
36 hashes
37 signatures
38 depth
39 prev_events
40 prev_state
41 auth_events
42 origin
43 creator
44 join_rule
45 history_visibility
46 ban
47 events_default
48 kick
49 redact
50 state_default
51 users
52 users_default
53 reason
54 visibility
55 room_alias_name
56 name
57 topic
58 invite
59 invite_3pid
60 room_version
61 creation_content
62 initial_state
63 preset
64 servers
65 identifier
66 user
67 medium
68 address
69 password
70 token
71 device_id
72 initial_device_display_name
73 access_token
74 home_server
75 well_known
76 base_url
77 device_lists
78 to_device
79 peek
80 last_seen_ip
81 display_name
82 typing
83 last_seen_ts
84 algorithm
85 sender_key
86 session_id
87 ciphertext
88 one_time_keys
89 timeout
90 recent_rooms
91 chunk
92 m.fully_read
93 device_keys
94 failures
95 device_display_name
96 prev_sender
97 replaces_state
98 changed
99 unstable_features
100 versions
101 devices
102 errcode
103 error
104 room_alias
"""

PAIRS = [(int(number), name) for number, name in (line.split(" ") for line in APPENDIX_A.split("\n") if line)]


def test_the_appendix_transcription_is_whole() -> None:
    assert [number for number, _ in PAIRS] == list(range(1, 105))
    assert len({name for _, name in PAIRS}) == 104


@pytest.mark.parametrize("number, name", PAIRS)
def test_every_key_means_what_the_appendix_says(number: int, name: str) -> None:
    assert KEY_TABLE_V1[number] == name
    assert KEY_TABLE_V1_REVERSE[name] == number
    # both directions of the translation the gateway does on air
    assert json_from_request({number: "v"}, KEY_TABLE_V1) == {name: "v"}
    assert keys_for_client({name: "v"}, 1) == {number: "v"}


def test_the_table_holds_nothing_else() -> None:
    assert dict(KEY_TABLE_V1) == dict(PAIRS)
    assert dict(KEY_TABLE_V1_REVERSE) == {name: number for number, name in PAIRS}
    assert KEY_TABLES[1] is KEY_TABLE_V1


def test_a_login_answer_on_air() -> None:
    answer = {"user_id": "@d:example.org", "access_token": "syt_x", "device_id": "DEV", "home_server": "example.org"}
    assert cbor2.dumps(keys_for_client(answer, 1)) == cbor2.dumps(
        {7: "@d:example.org", 73: "syt_x", 71: "DEV", 74: "example.org"})
