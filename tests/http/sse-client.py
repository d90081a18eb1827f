#!/usr/bin/env python3
"""A client of skv-http written with the Python standard library only: POST a JSON body, read
the server-sent events of the answer as they come, and print one JSON line: the status, the
text the chunks carried (completions: text; chat: delta.content), how many chunks came, the
last finish_reason and whether the stream ended with "data: [DONE]".

    sse-client.py URL BODY [API_KEY]
"""
import http.client
import json
import sys
import urllib.parse


def main():
    url, body = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else None
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = "Bearer " + key
    conn.request("POST", u.path, body=body.encode(), headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        print(json.dumps({"status": resp.status, "body": resp.read().decode()}))
        return
    ctype = resp.getheader("Content-Type", "")
    text, chunks, finish, done = [], 0, None, False
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if not event.get("choices"):
            continue
        choice = event["choices"][0]
        piece = choice.get("text")
        if piece is None:
            piece = (choice.get("delta") or {}).get("content") or ""
        text.append(piece)
        chunks += 1
        finish = choice.get("finish_reason") or finish
    print(json.dumps({"status": 200, "content_type": ctype, "text": "".join(text),
                      "chunks": chunks, "finish_reason": finish, "done": done}))


if __name__ == "__main__":
    main()
