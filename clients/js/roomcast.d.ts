// Types of the roomcast browser SDK (roomcast.js).

export declare const VERSION: string;

export declare const CLOSE: {
  readonly NORMAL: 1000;
  readonly RESTART: 1012;
  readonly SLOW_CONSUMER: 4001;
  readonly HEARTBEAT_TIMEOUT: 4002;
  readonly TOKEN_EXPIRED: 4003;
  readonly ABUSE: 4004;
};

/** A refused request or a failed connection; `code` is the gateway's error code
 *  (docs/protocol.md), or one of the SDK's: not_connected, connection_lost, closed, left,
 *  token, token_expired. */
export declare class RoomcastError extends Error {
  code: string;
  /** With `rate_limited`: when a retry can succeed. */
  retryMs?: number;
}

export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface Options {
  /** A JWT, or a function that returns one (or a promise of one): called at connect, before
   *  the token expires (then sent as `refresh`), and after a 4003 close. */
  token?: string | (() => string | Promise<string>);
  /** Reconnect delays: full jitter over min(max, initial * 2^attempt) ms. Default 500 / 30000. */
  backoff?: { initial?: number; max?: number };
  /** After a 1012 (node restart): reconnect within this many ms, spread. Default 2000. */
  restartSpread?: number;
  /** Application-level ping every `interval` ms; no frame back within `timeout` ms = dead.
   *  Default 20000 / 10000. */
  ping?: { interval?: number; timeout?: number };
  /** Refresh the token this many ms before it expires (at most a third of its life). Default 60000. */
  refreshBefore?: number;
  /** A WebSocket constructor (Node before 22: pass one, or run with --experimental-websocket). */
  WebSocket?: typeof WebSocket;
}

export interface Msg {
  op: 'msg';
  room?: string;
  to?: string;
  event: string;
  data: unknown;
  from: string;
  conn?: string;
  ts: number;
  info?: Record<string, unknown>;
  /** History rooms: the message's place in the room. */
  seq?: number;
  epoch?: string;
  binary?: boolean;
}

export interface JoinAck {
  op: 'ack';
  id: number;
  room?: string;
  epoch?: string;
  seq?: number;
  recovered?: boolean;
}

export interface SendAck {
  op: 'ack';
  id: number;
  /** History rooms: the message's seq. */
  seq?: number;
}

export interface Events {
  msg: Msg;
  presence: { room: string; online: number };
  state: { state: State; node?: string; delay?: number; error?: RoomcastError };
  error: RoomcastError;
  /** After a reconnect, per history room: `recovered: false` means messages were missed. */
  recovered: { room: string; recovered: boolean; ack: JoinAck };
  /** This client lagged and the gateway let it miss `count` droppable messages of `room`. */
  skipped: { room: string; count: number };
}

/** The delay (ms) before reconnect attempt `attempt`: random in [0, min(max, initial * 2^attempt)). */
export declare function backoffDelay(
  attempt: number,
  backoff: { initial: number; max: number },
  random?: () => number,
): number;

/** The `exp` claim of a JWT (Unix seconds), if it has one. */
export declare function tokenExpiry(token: string): number | undefined;

export declare class Roomcast {
  constructor(url: string, options?: Options);
  readonly state: State;
  /** The gateway node this connection is on (from its welcome). */
  readonly node?: string;
  on<E extends keyof Events>(event: E, handler: (value: Events[E]) => void): () => void;
  /** Join now or as soon as connected, and again after every reconnect (history rooms resume
   *  from their last seq). `history: N` replays a history room's last N messages at first. */
  join(room: string, options?: { history?: number }): Promise<JoinAck>;
  leave(room: string): Promise<void>;
  /** Resolves on the ack; rejects with a RoomcastError (code rate_limited, not_joined, unavailable,
   *  unconfirmed, not_connected, connection_lost…). */
  send(room: string, event: string, data?: unknown): Promise<SendAck>;
  sendTo(user: string, event: string, data?: unknown): Promise<SendAck>;
  close(): void;
}
