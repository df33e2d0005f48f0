/*
 * pushnode browser client (protocol v1). No dependencies; load it with
 *   <script src="http://your-node:9501/pushnode.js"></script>
 *
 *   const push = new PushNode({ url: "ws://localhost:9501/ws", getToken: async () => token });
 *   push.on("notification", (n) => console.log(n.id, n.data));
 *   push.connect();
 *
 * It reconnects by itself with exponential backoff and full jitter, and honours the node's
 * drain close (4000, "reconnect after N ms") so a rolling deploy is not a reconnect storm.
 * It resumes: after a reconnect it asks for every inbox notification after the last id it saw,
 * and drops duplicates by id, so a persisted notification is shown once per device.
 * It notices a connection that went silent (a node or network path that vanished without
 * closing it: browsers do not show WebSocket pings to scripts): with nothing heard for
 * pingInterval it sends a ping frame, and with still nothing within pongTimeout it drops the
 * connection and reconnects ("close" with code 1006).
 *
 * Events: "notification" (frame), "unread" (count), "welcome", "state", "close", "reconnect",
 * "error". Inbox: markRead([ids]), markReadUpTo(id), markAllRead().
 */
(function (global) {
  "use strict";

  var CLOSE_SHUTDOWN = 4000;

  function PushNode(options) {
    if (!(this instanceof PushNode)) return new PushNode(options);
    options = options || {};
    this.url = options.url || defaultUrl();
    this.getToken = options.getToken || null; // async () => token; called before every connect
    this.format = options.format || "json";
    this.minDelay = options.minDelay || 500;
    this.maxDelay = options.maxDelay || 30000;
    this.pingInterval = options.pingInterval || 20000; // JSON format only
    this.pongTimeout = options.pongTimeout || 10000;
    this.heardAt = 0;
    this.liveness = null;
    this.state = "idle"; // idle | connecting | connected | waiting | closed
    this.attempt = 0;
    this.lastId = options.lastId || null; // newest inbox id seen; sent as last_id on connect
    this.seen = new Set(); // recent persisted ids, for de-duplication
    this.seenOrder = [];
    this.channels = new Set();
    this.handlers = {};
    this.ws = null;
    this.timer = null;
    this.stopped = false;
  }

  function defaultUrl() {
    var l = global.location;
    return (l.protocol === "https:" ? "wss://" : "ws://") + l.host + "/ws";
  }

  PushNode.prototype.on = function (event, fn) {
    (this.handlers[event] = this.handlers[event] || []).push(fn);
    return this;
  };

  PushNode.prototype.emit = function (event, value) {
    (this.handlers[event] || []).forEach(function (fn) {
      try { fn(value); } catch (e) { console.error("pushnode handler", e); }
    });
  };

  PushNode.prototype.setState = function (state) {
    if (this.state !== state) {
      this.state = state;
      this.emit("state", state);
    }
  };

  PushNode.prototype.connect = function () {
    var self = this;
    this.stopped = false;
    clearTimeout(this.timer);
    this.setState("connecting");
    Promise.resolve(this.getToken ? this.getToken() : null).then(function (token) {
      if (self.stopped) return;
      var sep = self.url.indexOf("?") < 0 ? "?" : "&";
      var url = self.url + (token ? sep + "token=" + encodeURIComponent(token) : "");
      if (self.format !== "json") url += (url.indexOf("?") < 0 ? "?" : "&") + "format=" + self.format;
      if (self.lastId && self.format === "json") url += (url.indexOf("?") < 0 ? "?" : "&") + "last_id=" + encodeURIComponent(self.lastId);
      var ws = new WebSocket(url);
      self.ws = ws;
      ws.onmessage = function (event) { self.heardAt = Date.now(); self.onFrame(event.data); };
      ws.onclose = function (event) { self.onClose(event); };
    }, function (err) {
      self.emit("error", err);
      self.schedule(null);
    });
    return this;
  };

  PushNode.prototype.onFrame = function (data) {
    if (this.format === "raw") {
      this.emit("notification", { data: safeParse(data), raw: data });
      return;
    }
    var frame = safeParse(data);
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        this.attempt = 0;
        this.setState("connected");
        this.watch();
        var self = this;
        this.channels.forEach(function (c) { self.send({ type: "subscribe", channel: c }); });
        this.emit("welcome", frame);
        this.emit("unread", frame.unread || 0);
        break;
      case "notification":
        if (frame.persisted) {
          if (this.seen.has(frame.id)) return; // already shown on this device
          this.remember(frame.id);
          if (!this.lastId || compareIds(frame.id, this.lastId) > 0) this.lastId = frame.id;
        }
        this.emit("notification", frame);
        if (typeof frame.unread === "number") this.emit("unread", frame.unread);
        break;
      case "unread":
        this.emit("unread", frame.unread);
        break;
      case "error":
        this.emit("error", frame);
        break;
      default:
        this.emit(frame.type, frame);
    }
  };

  /* Pings a quiet connection; drops one that stays silent (see the header). */
  PushNode.prototype.watch = function () {
    var self = this, ws = this.ws, pingedAt = 0;
    clearInterval(this.liveness);
    var tick = Math.max(100, Math.min(this.pingInterval, this.pongTimeout) / 4);
    this.liveness = setInterval(function () {
      if (self.ws !== ws) { clearInterval(self.liveness); return; }
      var now = Date.now();
      if (pingedAt > self.heardAt && now - pingedAt >= self.pongTimeout) {
        clearInterval(self.liveness);
        ws.onmessage = ws.onclose = null;
        try { ws.close(); } catch (e) { /* already closing */ }
        self.onClose({ code: 1006, reason: "no answer within " + self.pongTimeout + " ms" });
      } else if (pingedAt <= self.heardAt && now - self.heardAt >= self.pingInterval) {
        pingedAt = now;
        self.send({ type: "ping" });
      }
    }, tick);
  };

  PushNode.prototype.onClose = function (event) {
    clearInterval(this.liveness);
    this.ws = null;
    this.emit("close", { code: event.code, reason: event.reason });
    if (this.stopped) {
      this.setState("closed");
      return;
    }
    var hinted = null;
    if (event.code === CLOSE_SHUTDOWN) {
      var m = /reconnect after (\d+) ms/.exec(event.reason || "");
      if (m) hinted = Number(m[1]);
    }
    this.schedule(hinted);
  };

  /* Full jitter: a random delay up to min(maxDelay, minDelay * 2^attempt). */
  PushNode.prototype.schedule = function (hinted) {
    var self = this;
    var cap = Math.min(this.maxDelay, this.minDelay * Math.pow(2, this.attempt));
    var delay = hinted !== null ? hinted : Math.floor(Math.random() * cap);
    this.attempt += 1;
    this.setState("waiting");
    this.emit("reconnect", { delay: delay, attempt: this.attempt });
    this.timer = setTimeout(function () { self.connect(); }, delay);
  };

  PushNode.prototype.send = function (frame) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(frame));
  };

  PushNode.prototype.subscribe = function (channel) {
    this.channels.add(channel);
    this.send({ type: "subscribe", channel: channel });
  };

  PushNode.prototype.unsubscribe = function (channel) {
    this.channels.delete(channel);
    this.send({ type: "unsubscribe", channel: channel });
  };

  PushNode.prototype.remember = function (id) {
    this.seen.add(id);
    this.seenOrder.push(id);
    if (this.seenOrder.length > 1000) this.seen.delete(this.seenOrder.shift());
  };

  PushNode.prototype.markRead = function (ids) { this.send({ type: "read", ids: ids }); };
  PushNode.prototype.markReadUpTo = function (id) { this.send({ type: "read", up_to: id }); };
  PushNode.prototype.markAllRead = function () { this.send({ type: "read", all: true }); };

  PushNode.prototype.close = function () {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
    else this.setState("closed");
  };

  /* Inbox ids are "<ms>-<seq>"; compare numerically. */
  function compareIds(a, b) {
    var x = a.split("-"), y = b.split("-");
    return (Number(x[0]) - Number(y[0])) || (Number(x[1]) - Number(y[1]));
  }

  function safeParse(text) {
    try { return JSON.parse(text); } catch (e) { return text; }
  }

  global.PushNode = PushNode;
})(typeof window !== "undefined" ? window : globalThis);
