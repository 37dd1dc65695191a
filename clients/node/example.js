// Set a job over kairoi-trio's gRPC API and read it back.
//
//   npm install
//   node example.js [host:port] [job-id]
//
// The client is built at run time from the same .proto the server uses, so
// nothing is generated or vendored. Set KAIROI_TOKEN when the server requires
// tokens. Prints the job as JSON and exits 0, or prints the error and exits 1.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "proto");

function loadScheduler() {
  const definition = protoLoader.loadSync("kairoi/v1/scheduler.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto: execute_at, not executeAt
    longs: String, // int64 seconds as strings, no precision loss
    enums: String, // "JOB_STATUS_PLANNED" rather than 1
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).kairoi.v1.Scheduler;
}

// google.protobuf.Timestamp <-> Date (millisecond precision on the JS side).
function toTimestamp(date) {
  const ms = date.getTime();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

function fromTimestamp(ts) {
  return new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6));
}

// Promise wrapper around a unary call, with the bearer token if any.
function call(client, method, request) {
  const metadata = new grpc.Metadata();
  if (process.env.KAIROI_TOKEN) {
    metadata.set("authorization", `Bearer ${process.env.KAIROI_TOKEN}`);
  }
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 10_000 }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

async function main() {
  const target = process.argv[2] || "127.0.0.1:5679";
  const id = process.argv[3] || "example.node.1";
  const Scheduler = loadScheduler();
  const client = new Scheduler(target, grpc.credentials.createInsecure());
  try {
    const executeAt = new Date(Date.now() + 3600 * 1000); // in an hour
    await call(client, "SetJob", {
      id,
      execute_at: toTimestamp(executeAt),
      payload: Buffer.from("hello from node"),
    });
    const { job } = await call(client, "GetJob", { id });
    console.log(
      JSON.stringify({
        id: job.id,
        status: job.status,
        execute_at: fromTimestamp(job.execute_at).toISOString(),
        payload: job.payload.toString(),
      }),
    );
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(`error: ${err.code !== undefined ? grpc.status[err.code] : ""} ${err.details || err.message}`);
  process.exit(1);
});
